-- SendCommand's optional request_id: a repeat with the same (device, request_id) returns the
-- command the first call queued instead of queueing another.
ALTER TABLE commands ADD COLUMN request_id text;
CREATE UNIQUE INDEX commands_request ON commands (device_id, request_id) WHERE request_id IS NOT NULL;
