package wire_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// compactJWE is an opaque, non-JSON payload as an end-to-end encrypted
// command carries it (five base64url segments).
const compactJWE = "eyJhbGciOiJSU0EtT0FFUC0yNTYiLCJlbmMiOiJBMjU2Q0JDLUhTNTEyIn0.a2V5.aXY.Y2lwaGVy.dGFn"

func TestDecodeEnvelope(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    wire.Envelope
		wantErr error
	}{
		{
			name: "camelCase keys, string payload",
			in:   `{"from":"a","to":"b","type":"auth","messageId":"m1","payload":"{\"token\":\"t\"}","errorMessage":"oops"}`,
			want: wire.Envelope{From: "a", To: "b", Type: "auth", MessageID: "m1", Payload: json.RawMessage(`"{\"token\":\"t\"}"`), ErrorMessage: "oops"},
		},
		{
			name: "PascalCase keys",
			in:   `{"From":"a","To":"b","Type":"command","MessageId":"m1","Payload":"x","ErrorMessage":"e"}`,
			want: wire.Envelope{From: "a", To: "b", Type: "command", MessageID: "m1", Payload: json.RawMessage(`"x"`), ErrorMessage: "e"},
		},
		{
			name: "upper and lower case keys",
			in:   `{"FROM":"a","tO":"b","TYPE":"list","messageid":"m1","PAYLOAD":[1],"errormessage":"e"}`,
			want: wire.Envelope{From: "a", To: "b", Type: "list", MessageID: "m1", Payload: json.RawMessage(`[1]`), ErrorMessage: "e"},
		},
		{
			name: "type is lower-cased",
			in:   `{"type":"WELCOME"}`,
			want: wire.Envelope{Type: "welcome"},
		},
		{
			name: "mixed case type",
			in:   `{"type":"AuthPortal"}`,
			want: wire.Envelope{Type: wire.TypeAuthPortal},
		},
		{
			name: "embedded object payload",
			in:   `{"type":"authportal","payload":{"jwToken":"t","protocolVersion":1}}`,
			want: wire.Envelope{Type: "authportal", Payload: json.RawMessage(`{"jwToken":"t","protocolVersion":1}`)},
		},
		{
			name: "embedded array payload",
			in:   `{"type":"list","payload":[{"clientId":"c"}]}`,
			want: wire.Envelope{Type: "list", Payload: json.RawMessage(`[{"clientId":"c"}]`)},
		},
		{
			name: "whitespace around payload and envelope",
			in:   " \n\t{ \"type\" : \"ping\" , \"payload\" :  { \"a\" : 1 }  }\r\n ",
			want: wire.Envelope{Type: "ping", Payload: json.RawMessage(`{ "a" : 1 }`)},
		},
		{
			name: "payload null means none",
			in:   `{"type":"list","payload":null}`,
			want: wire.Envelope{Type: "list"},
		},
		{
			name: "payload null with spaces means none",
			in:   `{"type":"list","payload":  null  }`,
			want: wire.Envelope{Type: "list"},
		},
		{
			name: "payload absent means none",
			in:   `{"type":"list"}`,
			want: wire.Envelope{Type: "list"},
		},
		{
			name: "empty string payload is kept",
			in:   `{"type":"list","payload":""}`,
			want: wire.Envelope{Type: "list", Payload: json.RawMessage(`""`)},
		},
		{
			name: "null fields read as empty",
			in:   `{"from":null,"to":null,"type":"pong","messageId":null,"errorMessage":null}`,
			want: wire.Envelope{Type: "pong"},
		},
		{
			name: "unknown fields are ignored",
			in:   `{"type":"ping","extra":{"deep":[1,2,3]},"another":true}`,
			want: wire.Envelope{Type: "ping"},
		},
		{
			name: "opaque JWE string payload",
			in:   `{"type":"command","payload":"` + compactJWE + `"}`,
			want: wire.Envelope{Type: "command", Payload: json.RawMessage(`"` + compactJWE + `"`)},
		},
		{
			name: "spec authportal example",
			in:   `{"from":"Console","to":"MachineService","type":"authportal","messageId":"428411b1-e8a0-4e5b-91b2-52cdd3b10fc3","payload":{"jwToken":"Access token","clientVersion":"","protocolVersion":1}}`,
			want: wire.Envelope{
				From: "Console", To: "MachineService", Type: "authportal", MessageID: "428411b1-e8a0-4e5b-91b2-52cdd3b10fc3",
				Payload: json.RawMessage(`{"jwToken":"Access token","clientVersion":"","protocolVersion":1}`),
			},
		},

		{name: "missing type", in: `{"from":"a","to":"b"}`, wantErr: wire.ErrMalformed},
		{name: "empty type", in: `{"type":""}`, wantErr: wire.ErrMalformed},
		{name: "null type", in: `{"type":null}`, wantErr: wire.ErrMalformed},
		{name: "empty object", in: `{}`, wantErr: wire.ErrMalformed},
		{name: "empty input", in: ``, wantErr: wire.ErrMalformed},
		{name: "only whitespace", in: " \n ", wantErr: wire.ErrMalformed},
		{name: "not JSON", in: `hello`, wantErr: wire.ErrMalformed},
		{name: "compact JWE instead of JSON", in: compactJWE, wantErr: wire.ErrMalformed},
		{name: "JSON null", in: `null`, wantErr: wire.ErrMalformed},
		{name: "JSON array", in: `[{"type":"ping"}]`, wantErr: wire.ErrMalformed},
		{name: "JSON string", in: `"ping"`, wantErr: wire.ErrMalformed},
		{name: "JSON number", in: `42`, wantErr: wire.ErrMalformed},
		{name: "truncated", in: `{"type":"ping"`, wantErr: wire.ErrMalformed},
		{name: "invalid payload JSON", in: `{"type":"ping","payload":{"a":}}`, wantErr: wire.ErrMalformed},
		{name: "trailing object", in: `{"type":"ping"}{"type":"pong"}`, wantErr: wire.ErrMalformed},
		{name: "trailing object after space", in: `{"type":"ping"} {}`, wantErr: wire.ErrMalformed},
		{name: "trailing text", in: `{"type":"ping"}x`, wantErr: wire.ErrMalformed},
		{name: "trailing number", in: `{"type":"ping"} 1`, wantErr: wire.ErrMalformed},
		{
			name: "trailing closing brace", in: `{"type":"ping"}}`, wantErr: wire.ErrMalformed,
		},
		{
			name: "trailing closing bracket", in: `{"type":"ping"} ]`, wantErr: wire.ErrMalformed,
		},
		{
			name: "second envelope after a closing brace", in: `{"type":"ping"}}{"type":"control","to":"agent-1"}`, wantErr: wire.ErrMalformed,
		},
		{name: "type is a number", in: `{"type":5}`, wantErr: wire.ErrMalformed},
		{name: "type is an array", in: `{"type":["ping"]}`, wantErr: wire.ErrMalformed},
		{name: "from is a number", in: `{"type":"ping","from":1}`, wantErr: wire.ErrMalformed},
		{name: "to is a bool", in: `{"type":"ping","to":true}`, wantErr: wire.ErrMalformed},
		{name: "messageId is an object", in: `{"type":"ping","messageId":{}}`, wantErr: wire.ErrMalformed},
		{name: "errorMessage is an array", in: `{"type":"ping","errorMessage":["x"]}`, wantErr: wire.ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := wire.DecodeEnvelope([]byte(tt.in))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("DecodeEnvelope(%q) error = %v, want %v (envelope %+v)", tt.in, err, tt.wantErr, got)
				}
				if !reflect.DeepEqual(got, wire.Envelope{}) {
					t.Errorf("DecodeEnvelope(%q) returned %+v with the error, want the zero envelope", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("DecodeEnvelope(%q) error = %v", tt.in, err)
			}
			assertEnvelope(t, got, tt.want)
		})
	}
}

// assertEnvelope compares two envelopes, the payload byte for byte.
func assertEnvelope(t *testing.T, got, want wire.Envelope) {
	t.Helper()
	if got.From != want.From || got.To != want.To || got.Type != want.Type ||
		got.MessageID != want.MessageID || got.ErrorMessage != want.ErrorMessage {
		t.Errorf("envelope = %+v, want %+v", got, want)
	}
	if string(got.Payload) != string(want.Payload) {
		t.Errorf("payload = %q, want %q", got.Payload, want.Payload)
	}
	if (got.Payload == nil) != (want.Payload == nil) {
		t.Errorf("payload nil = %v, want %v", got.Payload == nil, want.Payload == nil)
	}
}

func TestPayloadStyleAndHasPayload(t *testing.T) {
	tests := []struct {
		name      string
		payload   string
		nilPay    bool
		wantStyle wire.Style
		wantKnown bool
		wantHas   bool
	}{
		{name: "none", nilPay: true, wantStyle: wire.StyleString, wantKnown: false, wantHas: false},
		{name: "empty string", payload: `""`, wantStyle: wire.StyleString, wantKnown: true, wantHas: false},
		{name: "string", payload: `"{\"a\":1}"`, wantStyle: wire.StyleString, wantKnown: true, wantHas: true},
		{name: "object", payload: `{"a":1}`, wantStyle: wire.StyleEmbedded, wantKnown: true, wantHas: true},
		{name: "array", payload: `[]`, wantStyle: wire.StyleEmbedded, wantKnown: true, wantHas: true},
		{name: "number", payload: `7`, wantStyle: wire.StyleEmbedded, wantKnown: true, wantHas: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := wire.Envelope{Type: wire.TypePing}
			if !tt.nilPay {
				e.Payload = json.RawMessage(tt.payload)
			}
			style, known := e.PayloadStyle()
			if style != tt.wantStyle || known != tt.wantKnown {
				t.Errorf("PayloadStyle() = %v, %v, want %v, %v", style, known, tt.wantStyle, tt.wantKnown)
			}
			if has := e.HasPayload(); has != tt.wantHas {
				t.Errorf("HasPayload() = %v, want %v", has, tt.wantHas)
			}
		})
	}
}

func TestDecodePayload(t *testing.T) {
	welcome := wire.Welcome{
		PublicKeyHash:             "abcdefghijklmnop",
		MachineName:               "relay-1",
		ServerVersion:             "1.2.3",
		SupportedProtocolVersions: []int{1},
	}
	welcomeJSON, err := json.Marshal(welcome)
	if err != nil {
		t.Fatal(err)
	}
	quotedWelcome, err := json.Marshal(string(welcomeJSON))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("styles", func(t *testing.T) {
		tests := []struct {
			name    string
			payload string
		}{
			{name: "string style", payload: string(quotedWelcome)},
			{name: "embedded style", payload: string(welcomeJSON)},
			{name: "string style with whitespace", payload: `" \n{\"publicKeyHash\":\"abcdefghijklmnop\",\"machineName\":\"relay-1\",\"serverVersion\":\"1.2.3\",\"nonce\":null,\"supportedProtocolVersions\":[1]} "`},
			{name: "string style, different case keys", payload: `"{\"PublicKeyHash\":\"abcdefghijklmnop\",\"MachineName\":\"relay-1\",\"ServerVersion\":\"1.2.3\",\"SupportedProtocolVersions\":[1]}"`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				e := wire.Envelope{Type: wire.TypeWelcome, Payload: json.RawMessage(tt.payload)}
				var got wire.Welcome
				if err := e.DecodePayload(&got); err != nil {
					t.Fatalf("DecodePayload: %v", err)
				}
				if !reflect.DeepEqual(got, welcome) {
					t.Errorf("DecodePayload = %+v, want %+v", got, welcome)
				}
			})
		}
	})

	t.Run("list in both styles", func(t *testing.T) {
		for _, payload := range []string{
			`[{"clientId":"a","type":1},{"clientId":"b","type":2}]`,
			`"[{\"clientId\":\"a\",\"type\":1},{\"clientId\":\"b\",\"type\":2}]"`,
		} {
			e := wire.Envelope{Type: wire.TypeList, Payload: json.RawMessage(payload)}
			var got []wire.ClientRegistration
			if err := e.DecodePayload(&got); err != nil {
				t.Fatalf("DecodePayload(%s): %v", payload, err)
			}
			if len(got) != 2 || got[0].ClientID != "a" || got[0].Type != wire.ClientTypeAgent ||
				got[1].ClientID != "b" || got[1].Type != wire.ClientTypePortal {
				t.Errorf("DecodePayload(%s) = %+v", payload, got)
			}
		}
	})

	t.Run("errors", func(t *testing.T) {
		tests := []struct {
			name    string
			payload string
			nilPay  bool
			wantErr error
		}{
			{name: "no payload", nilPay: true, wantErr: wire.ErrNoPayload},
			{name: "empty string payload", payload: `""`, wantErr: wire.ErrNoPayload},
			{name: "string holding non-JSON", payload: `"` + compactJWE + `"`, wantErr: wire.ErrInvalidPayload},
			{name: "string holding truncated JSON", payload: `"{\"publicKeyHash\":"`, wantErr: wire.ErrInvalidPayload},
			{name: "embedded wrong shape", payload: `[1,2]`, wantErr: wire.ErrInvalidPayload},
			{name: "string holding wrong shape", payload: `"[1,2]"`, wantErr: wire.ErrInvalidPayload},
			{name: "wrong field type", payload: `{"machineName":5}`, wantErr: wire.ErrInvalidPayload},
			{name: "broken string literal", payload: `"unterminated`, wantErr: wire.ErrInvalidPayload},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				e := wire.Envelope{Type: wire.TypeWelcome}
				if !tt.nilPay {
					e.Payload = json.RawMessage(tt.payload)
				}
				var got wire.Welcome
				if err := e.DecodePayload(&got); !errors.Is(err, tt.wantErr) {
					t.Errorf("DecodePayload error = %v, want %v", err, tt.wantErr)
				}
			})
		}
	})
}

func TestAuthRequestTokenNames(t *testing.T) {
	tests := []struct {
		name string
		json string
		want string
	}{
		{name: "token", json: `{"token":"T"}`, want: "T"},
		{name: "jwToken", json: `{"jwToken":"J"}`, want: "J"},
		{name: "both, token wins", json: `{"jwToken":"J","token":"T"}`, want: "T"},
		{name: "both, token first, token wins", json: `{"token":"T","jwToken":"J"}`, want: "T"},
		{name: "empty token falls back to jwToken", json: `{"token":"","jwToken":"J"}`, want: "J"},
		{name: "null token falls back to jwToken", json: `{"token":null,"jwToken":"J"}`, want: "J"},
		{name: "neither", json: `{"clientVersion":"1"}`, want: ""},
		{name: "PascalCase Token", json: `{"Token":"T"}`, want: "T"},
		{name: "PascalCase JwToken", json: `{"JwToken":"J"}`, want: "J"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a wire.AuthRequest
			if err := json.Unmarshal([]byte(tt.json), &a); err != nil {
				t.Fatalf("Unmarshal: %v", err)
			}
			if a.Token != tt.want {
				t.Errorf("Token = %q, want %q", a.Token, tt.want)
			}
		})
	}

	t.Run("all fields", func(t *testing.T) {
		in := `{"jwToken":"J","publicKey":"PEM","clientVersion":"2.1","protocolVersion":1,"includeSubOrgs":true,"metadata":{"os":"linux","none":null}}`
		var a wire.AuthRequest
		if err := json.Unmarshal([]byte(in), &a); err != nil {
			t.Fatal(err)
		}
		linux := "linux"
		want := wire.AuthRequest{
			Token: "J", PublicKey: "PEM", ClientVersion: "2.1", ProtocolVersion: 1, IncludeSubOrgs: true,
			Metadata: map[string]*string{"os": &linux, "none": nil},
		}
		if !reflect.DeepEqual(a, want) {
			t.Errorf("AuthRequest = %+v, want %+v", a, want)
		}
	})

	t.Run("invalid", func(t *testing.T) {
		for _, in := range []string{`{"token":5}`, `{"jwToken":true}`, `[]`, `{`} {
			var a wire.AuthRequest
			if err := json.Unmarshal([]byte(in), &a); err == nil {
				t.Errorf("Unmarshal(%s) succeeded: %+v", in, a)
			}
		}
	})

	t.Run("through envelopes in both styles", func(t *testing.T) {
		for _, in := range []string{
			// As in the specification.
			`{"from":"Console","to":"MachineService","type":"authportal","messageId":"428411b1-e8a0-4e5b-91b2-52cdd3b10fc3","payload":{"jwToken":"Access token","clientVersion":"","protocolVersion":1}}`,
			// As the original portal sends it.
			`{"from":"Console","to":"MachineService","type":"authportal","messageId":"428411b1-e8a0-4e5b-91b2-52cdd3b10fc3","payload":"{\"token\":\"Access token\",\"clientVersion\":\"\",\"protocolVersion\":1}","errorMessage":null}`,
		} {
			e, err := wire.DecodeEnvelope([]byte(in))
			if err != nil {
				t.Fatalf("DecodeEnvelope: %v", err)
			}
			var a wire.AuthRequest
			if err := e.DecodePayload(&a); err != nil {
				t.Fatalf("DecodePayload: %v", err)
			}
			if a.Token != "Access token" || a.ProtocolVersion != 1 {
				t.Errorf("AuthRequest = %+v", a)
			}
		}
	})

	t.Run("marshals as token", func(t *testing.T) {
		data, err := json.Marshal(wire.AuthRequest{Token: "T", ProtocolVersion: 1})
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"token":"T","clientVersion":"","protocolVersion":1}`; string(data) != want {
			t.Errorf("Marshal = %s, want %s", data, want)
		}
	})
}

func TestMarshal(t *testing.T) {
	const head = `{"from":"MachineService","to":"c1","type":"command","messageId":"m1",`
	base := func(payload string) wire.Envelope {
		e := wire.Envelope{From: "MachineService", To: "c1", Type: wire.TypeCommand, MessageID: "m1"}
		if payload != "" {
			e.Payload = json.RawMessage(payload)
		}
		return e
	}
	tests := []struct {
		name  string
		env   wire.Envelope
		style wire.Style
		want  string
	}{
		{
			name: "string style keeps a string payload", env: base(`"{\"a\":1}"`), style: wire.StyleString,
			want: head + `"payload":"{\"a\":1}","errorMessage":null}`,
		},
		{
			name: "string style quotes an embedded object", env: base(`{"a":1,"b":[true,null]}`), style: wire.StyleString,
			want: head + `"payload":"{\"a\":1,\"b\":[true,null]}","errorMessage":null}`,
		},
		{
			name: "string style quotes an embedded array", env: base(`[1,"x"]`), style: wire.StyleString,
			want: head + `"payload":"[1,\"x\"]","errorMessage":null}`,
		},
		{
			name: "string style quotes an embedded number", env: base(`42`), style: wire.StyleString,
			want: head + `"payload":"42","errorMessage":null}`,
		},
		{
			name: "embedded style embeds a string holding an object", env: base(`"{\"a\":1,\"b\":[true,null]}"`), style: wire.StyleEmbedded,
			want: head + `"payload":{"a":1,"b":[true,null]},"errorMessage":null}`,
		},
		{
			name: "embedded style embeds a string holding an array", env: base(`"[1,\"x\"]"`), style: wire.StyleEmbedded,
			want: head + `"payload":[1,"x"],"errorMessage":null}`,
		},
		{
			name: "embedded style trims and compacts", env: base(`" \n{ \"a\" : 1 }\t"`), style: wire.StyleEmbedded,
			want: head + `"payload":{"a":1},"errorMessage":null}`,
		},
		{
			name: "embedded style keeps an embedded object", env: base(`{"a":1}`), style: wire.StyleEmbedded,
			want: head + `"payload":{"a":1},"errorMessage":null}`,
		},
		{
			name: "embedded style leaves a string holding a number", env: base(`"42"`), style: wire.StyleEmbedded,
			want: head + `"payload":"42","errorMessage":null}`,
		},
		{
			name: "embedded style leaves a string holding true", env: base(`"true"`), style: wire.StyleEmbedded,
			want: head + `"payload":"true","errorMessage":null}`,
		},
		{
			name: "embedded style leaves a string holding broken JSON", env: base(`"{\"a\":"`), style: wire.StyleEmbedded,
			want: head + `"payload":"{\"a\":","errorMessage":null}`,
		},
		{
			name: "embedded style leaves an empty string", env: base(`""`), style: wire.StyleEmbedded,
			want: head + `"payload":"","errorMessage":null}`,
		},
		{
			name: "compact JWE stays a string in string style", env: base(`"` + compactJWE + `"`), style: wire.StyleString,
			want: head + `"payload":"` + compactJWE + `","errorMessage":null}`,
		},
		{
			name: "compact JWE stays a string in embedded style", env: base(`"` + compactJWE + `"`), style: wire.StyleEmbedded,
			want: head + `"payload":"` + compactJWE + `","errorMessage":null}`,
		},
		{
			name: "null payload in string style", env: base(""), style: wire.StyleString,
			want: head + `"payload":null,"errorMessage":null}`,
		},
		{
			name: "null payload in embedded style", env: base(""), style: wire.StyleEmbedded,
			want: head + `"payload":null,"errorMessage":null}`,
		},
		{
			name: "error message in string style",
			env: wire.Envelope{
				From: "MachineService", To: "c1", Type: wire.TypeCommand, MessageID: "m1",
				ErrorMessage: wire.TextDestinationNotAvailable,
			},
			style: wire.StyleString,
			want:  head + `"payload":null,"errorMessage":"Destination not available for relay"}`,
		},
		{
			name:  "error message in embedded style",
			env:   wire.Envelope{Type: wire.TypeWarning, ErrorMessage: wire.TextTokenExpired},
			style: wire.StyleEmbedded,
			want:  `{"from":"","to":"","type":"warning","messageId":"","payload":null,"errorMessage":"Token expired"}`,
		},
		{
			name:  "empty fields are written",
			env:   wire.Envelope{Type: wire.TypePong},
			style: wire.StyleString,
			want:  `{"from":"","to":"","type":"pong","messageId":"","payload":null,"errorMessage":null}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := string(tt.env.Payload)
			got, err := tt.env.Marshal(tt.style)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			if string(got) != tt.want {
				t.Errorf("Marshal =\n%s\nwant\n%s", got, tt.want)
			}
			if !json.Valid(got) {
				t.Errorf("Marshal wrote invalid JSON: %s", got)
			}
			if string(tt.env.Payload) != before {
				t.Errorf("Marshal changed the envelope's payload from %s to %s", before, tt.env.Payload)
			}
		})
	}

	t.Run("invalid raw payload in embedded style", func(t *testing.T) {
		e := base(`{"a":`)
		if out, err := e.Marshal(wire.StyleEmbedded); err == nil {
			t.Errorf("Marshal succeeded with an invalid payload: %s", out)
		}
	})
}

func TestSetPayload(t *testing.T) {
	e := wire.Envelope{Type: wire.TypeAuth}
	if err := e.SetPayload(wire.AuthResult{Accepted: true}); err != nil {
		t.Fatal(err)
	}
	if want := `{"accepted":true,"willReplaceToken":false,"newToken":null}`; string(e.Payload) != want {
		t.Errorf("Payload = %s, want %s", e.Payload, want)
	}
	if !e.HasPayload() {
		t.Error("HasPayload() = false after SetPayload")
	}
	if err := e.SetPayload(nil); err != nil {
		t.Fatal(err)
	}
	if e.Payload != nil || e.HasPayload() {
		t.Errorf("SetPayload(nil) left payload %q", e.Payload)
	}
	if err := e.SetPayload(compactJWE); err != nil {
		t.Fatal(err)
	}
	if want := `"` + compactJWE + `"`; string(e.Payload) != want {
		t.Errorf("Payload = %s, want %s", e.Payload, want)
	}
	if err := e.SetPayload(make(chan int)); err == nil {
		t.Error("SetPayload(chan) succeeded")
	}
}

func TestRoundTrip(t *testing.T) {
	nonce := "n0nce"
	newToken := "new-token"
	body := "aGVsbG8="
	errText := "boom"
	output := "done"
	when := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	tests := []struct {
		name    string
		typ     string
		payload any
		fresh   func() any // a pointer to a zero value of the payload's type
	}{
		{
			name: "welcome", typ: wire.TypeWelcome,
			payload: wire.Welcome{PublicKeyHash: "0123456789abcdef", MachineName: "m", ServerVersion: "v", Nonce: &nonce, SupportedProtocolVersions: []int{1}},
			fresh:   func() any { return new(wire.Welcome) },
		},
		{
			name: "auth", typ: wire.TypeAuth,
			payload: wire.AuthRequest{Token: "t", PublicKey: "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n", ClientVersion: "2.1", ProtocolVersion: 1, Metadata: map[string]*string{"os": &output}},
			fresh:   func() any { return new(wire.AuthRequest) },
		},
		{
			name: "auth result", typ: wire.TypeAuth,
			payload: wire.AuthResult{Accepted: true, WillReplaceToken: true, NewToken: &newToken},
			fresh:   func() any { return new(wire.AuthResult) },
		},
		{
			name: "list", typ: wire.TypeList,
			payload: []wire.ClientRegistration{{
				ClientID: "c", ClientVersion: "1", OrganizationID: "o", MachineRegistrationID: "r", MachineServerURI: "wss://x/agent",
				Type: wire.ClientTypeAgent, LastUpdated: when, GatewayID: "g", LastUpdatedOn: when,
			}},
			fresh: func() any { return new([]wire.ClientRegistration) },
		},
		{
			name: "control", typ: wire.TypeControl,
			payload: wire.ControlRequest{Command: "restart", Parameters: map[string]*string{"a": &output, "b": nil}},
			fresh:   func() any { return new(wire.ControlRequest) },
		},
		{
			name: "control response", typ: wire.TypeControl,
			payload: wire.ControlResponse{Success: false, Output: map[string]*string{"x": &output}, ErrorMessage: &errText},
			fresh:   func() any { return new(wire.ControlResponse) },
		},
		{
			name: "command", typ: wire.TypeCommand,
			payload: wire.CommandRequest{Method: "GET", Path: "/api/v1/backups", Body: &body, Headers: map[string]string{"Accept": "application/json", "X": "<&>"}},
			fresh:   func() any { return new(wire.CommandRequest) },
		},
		{
			name: "command response", typ: wire.TypeCommand,
			payload: wire.CommandResponse{StatusCode: 200, Body: &body, Headers: map[string]string{"Content-Type": "text/plain"}},
			fresh:   func() any { return new(wire.CommandResponse) },
		},
		{
			name: "opaque string", typ: wire.TypeCommand,
			payload: compactJWE,
			fresh:   func() any { return new(string) },
		},
	}
	styles := []struct {
		name  string
		style wire.Style
	}{{"string", wire.StyleString}, {"embedded", wire.StyleEmbedded}}

	for _, tt := range tests {
		for _, st := range styles {
			t.Run(tt.name+"/"+st.name, func(t *testing.T) {
				in := wire.Envelope{From: "from-id", To: "to-id", Type: tt.typ, MessageID: "3f2504e0-4f89-11d3-9a0c-0305e82c3301", ErrorMessage: "note"}
				if err := in.SetPayload(tt.payload); err != nil {
					t.Fatal(err)
				}
				data, err := in.Marshal(st.style)
				if err != nil {
					t.Fatal(err)
				}
				out, err := wire.DecodeEnvelope(data)
				if err != nil {
					t.Fatalf("DecodeEnvelope(%s): %v", data, err)
				}
				if out.From != in.From || out.To != in.To || out.Type != in.Type || out.MessageID != in.MessageID || out.ErrorMessage != in.ErrorMessage {
					t.Errorf("round trip = %+v, want %+v", out, in)
				}
				gotStyle, ok := out.PayloadStyle()
				wantStyle := st.style
				if _, opaque := tt.payload.(string); opaque {
					wantStyle = wire.StyleString // an opaque string is a string in either style
				}
				if !ok || gotStyle != wantStyle {
					t.Errorf("PayloadStyle() = %v, %v, want %v, true (%s)", gotStyle, ok, wantStyle, data)
				}
				if _, opaque := tt.payload.(string); opaque {
					if string(out.Payload) != string(in.Payload) {
						t.Errorf("opaque payload = %s, want %s", out.Payload, in.Payload)
					}
					return
				}
				got := tt.fresh()
				if err := out.DecodePayload(got); err != nil {
					t.Fatalf("DecodePayload(%s): %v", out.Payload, err)
				}
				if want := tt.payload; !reflect.DeepEqual(reflect.ValueOf(got).Elem().Interface(), want) {
					t.Errorf("payload = %+v, want %+v", reflect.ValueOf(got).Elem().Interface(), want)
				}

				// Relayed to a client of the other style and back.
				other := wire.StyleEmbedded
				if st.style == wire.StyleEmbedded {
					other = wire.StyleString
				}
				data2, err := out.Marshal(other)
				if err != nil {
					t.Fatal(err)
				}
				out2, err := wire.DecodeEnvelope(data2)
				if err != nil {
					t.Fatal(err)
				}
				data3, err := out2.Marshal(st.style)
				if err != nil {
					t.Fatal(err)
				}
				if string(data3) != string(data) {
					t.Errorf("relayed through %v and back:\n%s\nwant\n%s", other, data3, data)
				}
			})
		}
	}

	t.Run("decode then marshal reproduces the original", func(t *testing.T) {
		for _, in := range []string{
			`{"from":"a","to":"b","type":"auth","messageId":"m","payload":"{\"token\":\"t\"}","errorMessage":null}`,
			`{"from":"a","to":"b","type":"list","messageId":"m","payload":null,"errorMessage":"x"}`,
			`{"from":"a","to":"b","type":"command","messageId":"m","payload":"` + compactJWE + `","errorMessage":null}`,
		} {
			e, err := wire.DecodeEnvelope([]byte(in))
			if err != nil {
				t.Fatal(err)
			}
			out, err := e.Marshal(wire.StyleString)
			if err != nil {
				t.Fatal(err)
			}
			if string(out) != in {
				t.Errorf("Marshal(DecodeEnvelope(x)) =\n%s\nwant\n%s", out, in)
			}
		}
	})

	t.Run("embedded whitespace becomes compact", func(t *testing.T) {
		e, err := wire.DecodeEnvelope([]byte(`{"type":"list","payload":[ {"clientId" : "a"} ]}`))
		if err != nil {
			t.Fatal(err)
		}
		out, err := e.Marshal(wire.StyleEmbedded)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), `"payload":[{"clientId":"a"}]`) {
			t.Errorf("Marshal = %s", out)
		}
	})
}

// TestMarshalKeepsNonJSONStrings checks that an opaque string is passed on
// as it is, as doc.go promises ("A string payload that does not hold JSON
// ... is passed on as it is in either style"). JSON whitespace is only
// space, tab, CR and LF.
func TestMarshalKeepsNonJSONStrings(t *testing.T) {
	tests := []struct {
		name    string
		payload string
	}{
		{name: "plain text", payload: `"hello world"`},
		{name: "brace text", payload: `"{not json}"`},
		{name: "two objects", payload: `"{}{}"`},
		{
			name: "vertical tab before an object", payload: `"\u000b{\"a\":1}"`,
		},
		{
			name: "no-break space after an object", payload: `"{\"a\":1}\u00a0"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := wire.Envelope{Type: wire.TypeCommand, Payload: json.RawMessage(tt.payload)}
			var v any
			if err := e.DecodePayload(&v); err == nil {
				t.Fatalf("test case is JSON: %v", v)
			}
			out, err := e.Marshal(wire.StyleEmbedded)
			if err != nil {
				t.Fatal(err)
			}
			want := `{"from":"","to":"","type":"command","messageId":"","payload":` + tt.payload + `,"errorMessage":null}`
			if string(out) != want {
				t.Errorf("Marshal =\n%s\nwant\n%s", out, want)
			}
		})
	}
}
