-- The registry of connected clients that several instances share, its
-- history, the instances' heartbeats and the statistics counters.

CREATE TABLE instances (
    instance_id        text        PRIMARY KEY,
    machine_server_uri text        NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat          timestamptz NOT NULL DEFAULT now()
);
-- The reaper looks for instances whose heartbeat stopped.
CREATE INDEX instances_heartbeat ON instances (heartbeat);

-- One row per client id and organization. Deleting an instance's row
-- removes its clients: that is how a dead instance's clients are reaped
-- and how a clean shutdown removes its own.
CREATE TABLE clients (
    client_id               text        NOT NULL,
    organization_id         text        NOT NULL,
    client_type             smallint    NOT NULL,
    instance_id             text        NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
    connection_id           text        NOT NULL,
    machine_server_uri      text        NOT NULL DEFAULT '',
    client_version          text        NOT NULL DEFAULT '',
    machine_registration_id text        NOT NULL DEFAULT '',
    client_ip               text        NOT NULL DEFAULT '',
    first_seen              timestamptz NOT NULL DEFAULT now(),
    last_updated            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, organization_id)
);
-- list: the fresh agents of some organizations.
CREATE INDEX clients_list ON clients (organization_id, client_type, last_updated);
-- The cascade from instances, and re-registration after an outage.
CREATE INDEX clients_instance ON clients (instance_id);
-- The daily cleanup of stale rows.
CREATE INDEX clients_last_updated ON clients (last_updated);

CREATE TABLE client_history (
    id                      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event                   text        NOT NULL CHECK (event IN ('register', 'unregister')),
    at                      timestamptz NOT NULL DEFAULT now(),
    client_id               text        NOT NULL,
    organization_id         text        NOT NULL,
    client_type             smallint    NOT NULL,
    instance_id             text        NOT NULL,
    connection_id           text        NOT NULL,
    client_ip               text        NOT NULL DEFAULT '',
    client_version          text        NOT NULL DEFAULT '',
    machine_registration_id text        NOT NULL DEFAULT '',
    bytes_in                bigint,
    bytes_out               bigint
);
CREATE INDEX client_history_at ON client_history (at);
CREATE INDEX client_history_client ON client_history (organization_id, client_id, at);

CREATE TABLE statistics (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text        NOT NULL,
    at          timestamptz NOT NULL,
    counters    jsonb       NOT NULL
);
CREATE INDEX statistics_at ON statistics (at);
CREATE INDEX statistics_instance_at ON statistics (instance_id, at);
