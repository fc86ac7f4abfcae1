-- The session-recording schema on SQLite. Ids are UUID text, timestamps RFC 3339 UTC text
-- with microseconds (fixed width, so they sort as text), JSON as text.
CREATE TABLE orgs (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    feature_session_recording INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE org_members (
    org_id TEXT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'member')),
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE machines (
    id TEXT PRIMARY KEY NOT NULL,
    org_id TEXT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    owner_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    node_key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE INDEX machines_org ON machines(org_id);

CREATE TABLE org_settings (
    org_id TEXT PRIMARY KEY NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    recording_enabled INTEGER NOT NULL DEFAULT 0,
    recording_retention_days INTEGER NOT NULL DEFAULT 90,
    recording_storage_mode TEXT NOT NULL DEFAULT 'platform'
        CHECK (recording_storage_mode IN ('platform', 'custom'))
);

CREATE TABLE session_recordings (
    id TEXT PRIMARY KEY NOT NULL,
    org_id TEXT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    machine_id TEXT REFERENCES machines(id) ON DELETE SET NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    session_type TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'completed')),
    started_at TEXT NOT NULL,
    ended_at TEXT,
    duration_seconds INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}',
    r2_key TEXT
);
CREATE INDEX session_recordings_org_started ON session_recordings(org_id, started_at DESC, id DESC);
-- `list` filtered by machine or by status, in list order.
CREATE INDEX session_recordings_machine ON session_recordings(machine_id, started_at DESC, id DESC);
CREATE INDEX session_recordings_org_status_started
    ON session_recordings(org_id, status, started_at DESC, id DESC);
-- Covers the per-status stats (count, sum of durations) without touching the table.
CREATE INDEX session_recordings_org_status ON session_recordings(org_id, status, duration_seconds);
CREATE INDEX session_recordings_org_machine_status
    ON session_recordings(org_id, machine_id, status, duration_seconds);

-- metadata.chunks, one row per chunk: concurrent uploads are independent upserts.
CREATE TABLE session_recording_chunks (
    session_id TEXT NOT NULL REFERENCES session_recordings(id) ON DELETE CASCADE,
    chunk_index INTEGER NOT NULL CHECK (chunk_index >= 0),
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    last_event_time REAL,
    PRIMARY KEY (session_id, chunk_index)
);
