package bus

import (
	"errors"
	"fmt"
	"strings"
)

// subjects are the subject names under one prefix.
type subjects struct {
	prefix      string
	authAgent   string
	authPortal  string
	control     string
	activity    string
	certificate string
	list        string
}

func newSubjects(prefix string) subjects {
	return subjects{
		prefix:      prefix,
		authAgent:   prefix + ".auth.agent",
		authPortal:  prefix + ".auth.portal",
		control:     prefix + ".control",
		activity:    prefix + ".events.activity",
		certificate: prefix + ".events.certificate",
		list:        prefix + ".events.list",
	}
}

func (s subjects) instance(id, kind string) string {
	return s.prefix + ".instance." + SubjectToken(id) + "." + kind
}

// SubjectToken turns an instance id into one subject token: letters,
// digits, '-' and '_' stay, every other byte is written %XX, so ids with
// dots or spaces stay distinct and never act as wildcards.
func SubjectToken(s string) string {
	if s == "" {
		return "%"
	}
	var sb strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			sb.WriteByte(c)
			continue
		}
		fmt.Fprintf(&sb, "%%%02X", c)
	}
	return sb.String()
}

// ValidSubjectPrefix checks a subject prefix: dot-separated tokens of
// letters, digits, '-' and '_'.
func ValidSubjectPrefix(p string) error {
	if p == "" {
		return errors.New("subject prefix is empty")
	}
	for tok := range strings.SplitSeq(p, ".") {
		if tok == "" {
			return fmt.Errorf("subject prefix %q has an empty token", p)
		}
		for _, c := range tok {
			if (c < 'a' || c > 'z') && (c < 'A' || c > 'Z') && (c < '0' || c > '9') && c != '-' && c != '_' {
				return fmt.Errorf("subject prefix %q: %q is not allowed (letters, digits, '-', '_' and '.' between tokens)", p, c)
			}
		}
	}
	return nil
}
