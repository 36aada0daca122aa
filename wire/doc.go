// Package wire defines the Machine Services wire protocol: the message
// envelope, the message types and their payloads, and the three wrappings a
// message travels in (plain JSON, JWS-signed, JWE-encrypted). It performs no
// network I/O, so servers, clients and tests share one definition.
//
// # Message flow
//
// Every connection is opened by the client. The server speaks first:
//
//	server -> client   welcome     plain, payload Welcome (server key hash)
//
// A portal (route /portal) then speaks plain JSON both ways:
//
//	portal -> server   authportal  AuthRequest{token, includeSubOrgs}
//	server -> portal   authportal  AuthResult{accepted}; closed when not accepted
//	portal -> server   list        payload null
//	server -> portal   list        []ClientRegistration (also pushed when agents come and go)
//	portal -> server   command     opaque payload, "to" = an agent's client id
//	server -> portal   command     the agent's answer, or errorMessage
//	                               "Destination not available for relay"
//
// An agent (route /agent) sends every message after the welcome as a compact
// JWE encrypted to the server's public key (RSA-OAEP-256, A256CBC-HS512), and
// once it is authenticated receives every message as a JWE encrypted to the
// public key it gave in its auth message:
//
//	agent  -> server   auth        AuthRequest{token, publicKey, protocolVersion, metadata}
//	server -> agent    auth        AuthResult{accepted, willReplaceToken, newToken}
//	server -> agent    command     relayed from a portal; the agent answers with
//	agent  -> server   command     the same messageId, "to" = the portal's client id
//	server -> agent    control     ControlRequest{command, parameters}
//	agent  -> server   control     ControlResponse{success, output, errorMessage}, same messageId
//
// Both kinds send ping and receive pong once authenticated. A connection
// whose token has expired receives a warning with errorMessage
// "Token expired" and is closed.
//
// # Payload styles
//
// The original server and the Duplicati agent carry the payload as a JSON
// string that holds serialized JSON; the specification's examples embed the
// payload as a JSON object or array. Decoding accepts both. [Envelope.Marshal]
// writes the payload in the [Style] of the connection it is meant for, so
// each client is answered the way it speaks. A string payload that does not
// hold JSON (an end-to-end encrypted command, for example) is passed on as it
// is in either style.
package wire
