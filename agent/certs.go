package agent

import (
	"context"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/machineservice/machineservice/wire"
)

// maxCertificatesBody bounds the certificate list read from the server.
const maxCertificatesBody = 1 << 20

// certStore holds the server keys the agent trusts, and fetches them
// again when the welcome names one it does not know.
type certStore struct {
	url    string
	client *http.Client
	now    func() time.Time
	onNew  func([]wire.Certificate)

	mu   sync.Mutex
	list []wire.Certificate
}

// find returns the unexpired key whose hash is hash. The hash is computed
// from the key, not taken from the entry, so an entry cannot claim a key
// it does not hold.
func (s *certStore) find(hash string) *rsa.PublicKey {
	s.mu.Lock()
	list := s.list
	s.mu.Unlock()
	now := s.now()
	for _, c := range list {
		if !c.Expiry.IsZero() && !c.Expiry.After(now) {
			continue
		}
		key, err := wire.ParsePublicKey(c.PublicKey)
		if err != nil {
			continue // an unusable entry cannot match; refresh filters them out
		}
		if wire.PublicKeyHash(key) == hash {
			return key
		}
	}
	return nil
}

// refresh fetches the certificate list and keeps its usable entries.
func (s *certStore) refresh(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCertificates, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCertificates, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w: GET %s: %s", ErrCertificates, s.url, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxCertificatesBody))
	if err != nil {
		return fmt.Errorf("%w: GET %s: %v", ErrCertificates, s.url, err)
	}
	var list []wire.Certificate
	if err := json.Unmarshal(data, &list); err != nil {
		return fmt.Errorf("%w: GET %s: %v", ErrCertificates, s.url, err)
	}
	now := s.now()
	usable := make([]wire.Certificate, 0, len(list))
	for _, c := range list {
		if c.Expiry.IsZero() || c.Expiry.After(now) {
			if _, err := wire.ParsePublicKey(c.PublicKey); err == nil {
				usable = append(usable, c)
			}
		}
	}
	if len(usable) == 0 {
		return fmt.Errorf("%w: GET %s: no usable certificate among %d", ErrCertificates, s.url, len(list))
	}
	s.mu.Lock()
	s.list = usable
	s.mu.Unlock()
	if s.onNew != nil {
		s.onNew(append([]wire.Certificate(nil), usable...))
	}
	return nil
}
