-- Control requests find an agent by its registered agent id.
CREATE INDEX clients_agent ON clients (machine_registration_id, last_updated) WHERE client_type = 1;
