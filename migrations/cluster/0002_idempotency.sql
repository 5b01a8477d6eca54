-- Idempotency records of writes to cluster tables: the remembered answer
-- of the first request with an Idempotency-Key, shared by every node, so a
-- retry sent to another node is answered from it. `id` is the SHA-256 (hex)
-- of principal, table and key; `record` is JSON; `expires_at` Unix ms.
CREATE TABLE larder_idempotency (
    id          text PRIMARY KEY,
    record      text NOT NULL,
    expires_at  bigint NOT NULL
);
CREATE INDEX larder_idempotency_expiry ON larder_idempotency (expires_at);
