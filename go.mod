module github.com/machineservice/machineservice

go 1.26.8

require (
	github.com/go-jose/go-jose/v4 v4.1.9
	github.com/golang-jwt/jwt/v5 v5.3.0
	github.com/google/uuid v1.6.0
	github.com/gorilla/websocket v1.5.3
	go.uber.org/goleak v1.3.0
	golang.org/x/term v0.47.0
)

require golang.org/x/sys v0.49.0 // indirect
