package server

// AgentsChanged sends a fresh list to every portal that sees one of the
// organizations, here and on the other instances. The registry calls it
// for changes that no connection made: the agents of a dead instance
// reaped, entries written back after a database outage.
func (s *Server) AgentsChanged(organizationIDs []string) {
	for _, org := range organizationIDs {
		s.pushList(org)
	}
}
