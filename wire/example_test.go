package wire_test

import (
	"fmt"

	"github.com/machineservice/machineservice/wire"
)

// A server answers a portal's authportal message in the string style the
// original server and the Duplicati clients speak: the payload travels as
// a JSON string holding JSON, and an empty error message as null.
func ExampleEnvelope_Marshal() {
	e := wire.Envelope{
		From:      "MachineService",
		To:        "Console",
		Type:      wire.TypeAuthPortal,
		MessageID: "428411b1-e8a0-4e5b-91b2-52cdd3b10fc3",
	}
	if err := e.SetPayload(wire.AuthResult{Accepted: true}); err != nil {
		fmt.Println(err)
		return
	}
	data, err := e.Marshal(wire.StyleString)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(string(data))
	// Output:
	// {"from":"MachineService","to":"Console","type":"authportal","messageId":"428411b1-e8a0-4e5b-91b2-52cdd3b10fc3","payload":"{\"accepted\":true,\"willReplaceToken\":false,\"newToken\":null}","errorMessage":null}
}
