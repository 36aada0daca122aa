package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// Message types. They travel as lower-case strings in the envelope's type.
const (
	TypeWelcome    = "welcome"
	TypeAuth       = "auth"
	TypeAuthPortal = "authportal"
	TypeList       = "list"
	TypeCommand    = "command"
	TypeControl    = "control"
	TypePing       = "ping"
	TypePong       = "pong"
	TypeWarning    = "warning"
)

// Style is how an envelope's payload is written.
type Style uint8

const (
	// StyleString writes the payload as a JSON string holding serialized
	// JSON, as the original server and the Duplicati agent do.
	StyleString Style = iota
	// StyleEmbedded writes the payload as an embedded JSON value.
	StyleEmbedded
)

// Envelope is one protocol message.
type Envelope struct {
	From      string
	To        string
	Type      string
	MessageID string
	// Payload is the payload as a raw JSON value: nil for none, a JSON
	// string in the string style, or any other JSON value.
	Payload json.RawMessage
	// ErrorMessage is written as null when empty.
	ErrorMessage string
}

type envelopeJSON struct {
	From         *string         `json:"from"`
	To           *string         `json:"to"`
	Type         *string         `json:"type"`
	MessageID    *string         `json:"messageId"`
	Payload      json.RawMessage `json:"payload"`
	ErrorMessage *string         `json:"errorMessage"`
}

// DecodeEnvelope parses a plain envelope. Keys match case-insensitively;
// the type is lower-cased. A message without a type is malformed.
func DecodeEnvelope(data []byte) (Envelope, error) {
	var raw envelopeJSON
	// Unmarshal, unlike a Decoder, refuses anything after the envelope.
	if err := json.Unmarshal(data, &raw); err != nil {
		return Envelope{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	env := Envelope{
		From:         deref(raw.From),
		To:           deref(raw.To),
		Type:         strings.ToLower(deref(raw.Type)),
		MessageID:    deref(raw.MessageID),
		ErrorMessage: deref(raw.ErrorMessage),
	}
	if env.Type == "" {
		return Envelope{}, fmt.Errorf("%w: no message type", ErrMalformed)
	}
	if p := bytes.TrimSpace(raw.Payload); len(p) > 0 && !bytes.Equal(p, []byte("null")) {
		env.Payload = p
	}
	return env, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// PayloadStyle reports the style the payload was written in, and false when
// there is no payload to tell by.
func (e *Envelope) PayloadStyle() (Style, bool) {
	if len(e.Payload) == 0 {
		return StyleString, false
	}
	if e.Payload[0] == '"' {
		return StyleString, true
	}
	return StyleEmbedded, true
}

// HasPayload reports whether the envelope carries a payload. An empty JSON
// string counts as none, as in the original.
func (e *Envelope) HasPayload() bool {
	return len(e.Payload) > 0 && !bytes.Equal(e.Payload, []byte(`""`))
}

// DecodePayload unmarshals the payload into v, accepting both styles.
func (e *Envelope) DecodePayload(v any) error {
	if !e.HasPayload() {
		return ErrNoPayload
	}
	data := []byte(e.Payload)
	if data[0] == '"' {
		var s string
		if err := json.Unmarshal(data, &s); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalidPayload, err)
		}
		data = []byte(s)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidPayload, err)
	}
	return nil
}

// SetPayload marshals v as the payload. A nil v clears it.
func (e *Envelope) SetPayload(v any) error {
	if v == nil {
		e.Payload = nil
		return nil
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("marshal payload: %w", err)
	}
	e.Payload = data
	return nil
}

// Marshal writes the envelope as JSON with camelCase keys and the payload in
// style s.
func (e *Envelope) Marshal(s Style) ([]byte, error) {
	out := struct {
		From         string          `json:"from"`
		To           string          `json:"to"`
		Type         string          `json:"type"`
		MessageID    string          `json:"messageId"`
		Payload      json.RawMessage `json:"payload"`
		ErrorMessage *string         `json:"errorMessage"`
	}{From: e.From, To: e.To, Type: e.Type, MessageID: e.MessageID, Payload: styled(e.Payload, s)}
	if e.ErrorMessage != "" {
		out.ErrorMessage = &e.ErrorMessage
	}
	data, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("marshal envelope: %w", err)
	}
	return data, nil
}

// styled converts a raw payload to style s without changing its content.
func styled(p json.RawMessage, s Style) json.RawMessage {
	if len(p) == 0 {
		return json.RawMessage("null")
	}
	isString := p[0] == '"'
	switch {
	case s == StyleString && !isString:
		quoted, _ := json.Marshal(string(p)) // marshalling a string cannot fail
		return quoted
	case s == StyleEmbedded && isString:
		var inner string
		if json.Unmarshal(p, &inner) != nil {
			return p
		}
		trimmed := strings.Trim(inner, " \t\r\n") // JSON's white space only
		if trimmed == "" || (trimmed[0] != '{' && trimmed[0] != '[') || !json.Valid([]byte(trimmed)) {
			return p // not JSON: an opaque string stays a string
		}
		return json.RawMessage(trimmed)
	}
	return p
}
