-- Copies of snapshot nodes kept on other nodes than the one holding them (`snapshots.node_id`),
-- so that a paused sandbox resumes elsewhere when its node dies. A copy is the node's disk made
-- whole down to its template's layer, its memory and its guest's channel key, in the holding
-- node's `snapshots/<id>/`. Rows go when the sandbox resumes, moves or the snapshot is deleted.
CREATE TABLE snapshot_replicas (
    snapshot_id  TEXT NOT NULL,
    node_id      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, node_id)
);
