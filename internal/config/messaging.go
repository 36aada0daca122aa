package config

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/machineservice/machineservice/internal/bus"
)

// validateMessaging checks the message bus settings.
func (c *Config) validateMessaging() []error {
	var errs []error
	if c.MessagingURL != "" {
		for i, entry := range strings.Split(c.MessagingURL, ",") {
			if err := checkNATSURL(strings.TrimSpace(entry)); err != nil {
				// The entry is not repeated: it may hold a password.
				errs = append(errs, fmt.Errorf("MESSAGING__CONNECTIONSTRING: entry %d %v", i+1, err))
			}
		}
	}
	if err := bus.ValidSubjectPrefix(c.MessagingSubjectPrefix); err != nil {
		errs = append(errs, fmt.Errorf("MESSAGING__SUBJECTPREFIX: %v", err))
	}
	return errs
}

func checkNATSURL(s string) error {
	const want = "(want nats://host:port, or tls://, ws://, wss://)"
	if s == "" {
		return fmt.Errorf("is empty %s", want)
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return fmt.Errorf("is not a URL %s", want)
	}
	switch u.Scheme {
	case "nats", "tls", "ws", "wss":
	default:
		return fmt.Errorf("has scheme %q %s", u.Scheme, want)
	}
	return nil
}

// controllerFlags are the flags of the controller command.
var controllerFlags = map[string]bool{"dev": true, "tokens": true, "nats": true}

// LoadController reads the settings of the controller command, which runs
// the built-in controller alone on the bus: defaults, the environment,
// then the flags --dev, --tokens and --nats. Only the settings it uses
// are validated: a bus and a token source are required.
func LoadController(args []string, getenv func(string) string) (*Config, error) {
	c, err := parse("controller", args, getenv, func(s Setting) bool { return controllerFlags[s.Flag] })
	if err != nil {
		return nil, err
	}
	errs := c.validateMessaging()
	if c.MessagingURL == "" {
		errs = append(errs, errors.New("MESSAGING__CONNECTIONSTRING (--nats): required: the controller answers on the NATS bus, nats://host:port"))
	}
	if c.TokensFile == "" && c.JWTSecret == "" && c.JWTPublicKeyFile == "" {
		errs = append(errs, errors.New("AUTH__TOKENSFILE (--tokens): the controller needs a token source: a tokens file, AUTH__JWTSECRET or AUTH__JWTPUBLICKEYFILE"))
	}
	if c.JWTSecret != "" && c.JWTPublicKeyFile != "" {
		errs = append(errs, errors.New("AUTH__JWTSECRET: set either AUTH__JWTSECRET or AUTH__JWTPUBLICKEYFILE, not both"))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrUsage, errors.Join(errs...))
	}
	return c, nil
}
