package wire_test

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/machineservice/machineservice/wire"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// TestGolden pins the exact bytes of representative envelopes. Run
// `go test ./wire -run TestGolden -update` to rewrite testdata/*.golden
// after an intended change, and review the diff.
func TestGolden(t *testing.T) {
	when := time.Date(2024, 3, 14, 15, 9, 26, 0, time.UTC)
	newToken := "eyJhbGciOiJSUzI1NiJ9.new.token"
	tests := []struct {
		file    string
		env     wire.Envelope
		payload any
		style   wire.Style
	}{
		{
			file: "welcome_string.golden",
			env: wire.Envelope{
				From: "MachineService", Type: wire.TypeWelcome,
				MessageID: "0b9c6a1e-4d7e-4d5b-9a8e-2f1d3c4b5a69",
			},
			payload: wire.Welcome{
				PublicKeyHash:             "Zm9vYmFyYmF6cXV4",
				MachineName:               "relay-eu-1",
				ServerVersion:             "1.0.0",
				SupportedProtocolVersions: wire.SupportedProtocolVersions,
			},
			style: wire.StyleString,
		},
		{
			file: "list_embedded.golden",
			env: wire.Envelope{
				From: "MachineService", To: "portal-7", Type: wire.TypeList,
				MessageID: "6f1c2b3a-0d9e-4f8a-b7c6-d5e4f3a2b1c0",
			},
			payload: []wire.ClientRegistration{
				{
					ClientID: "agent-1", ClientVersion: "2.1.0.5", OrganizationID: "org-1",
					MachineRegistrationID: "reg-1", MachineServerURI: "wss://relay.example/agent",
					Type: wire.ClientTypeAgent, LastUpdated: when, GatewayID: "gw-1", LastUpdatedOn: when,
				},
				{
					ClientID: "portal-7", ClientVersion: "1.0", OrganizationID: "org-1",
					MachineServerURI: "wss://relay.example/portal",
					Type:             wire.ClientTypePortal, LastUpdated: when, GatewayID: "gw-1", LastUpdatedOn: when,
				},
			},
			style: wire.StyleEmbedded,
		},
		{
			file: "authportal_result_embedded.golden",
			env: wire.Envelope{
				From: "MachineService", To: "Console", Type: wire.TypeAuthPortal,
				MessageID: "428411b1-e8a0-4e5b-91b2-52cdd3b10fc3",
			},
			payload: wire.AuthResult{Accepted: true},
			style:   wire.StyleEmbedded,
		},
		{
			file: "auth_result_string.golden",
			env: wire.Envelope{
				From: "MachineService", To: "agent-1", Type: wire.TypeAuth,
				MessageID: "d2c1b0a9-8f7e-4d6c-5b4a-392817263544",
			},
			payload: wire.AuthResult{Accepted: true, WillReplaceToken: true, NewToken: &newToken},
			style:   wire.StyleString,
		},
		{
			file: "warning_token_expired.golden",
			env: wire.Envelope{
				From: "MachineService", To: "agent-1", Type: wire.TypeWarning,
				MessageID: "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d", ErrorMessage: wire.TextTokenExpired,
			},
			style: wire.StyleString,
		},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			e := tt.env
			if err := e.SetPayload(tt.payload); err != nil {
				t.Fatal(err)
			}
			got, err := e.Marshal(tt.style)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", tt.file)
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs (run with -update to rewrite it)\ngot:  %s\nwant: %s", path, got, want)
			}

			// The golden bytes decode back to the same envelope.
			back, err := wire.DecodeEnvelope(want)
			if err != nil {
				t.Fatalf("DecodeEnvelope(%s): %v", path, err)
			}
			again, err := back.Marshal(tt.style)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, want) {
				t.Errorf("re-marshalled %s differs\ngot:  %s\nwant: %s", path, again, want)
			}
		})
	}
}
