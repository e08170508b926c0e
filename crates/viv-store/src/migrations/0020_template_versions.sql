-- Versions of templates: every build (and every commit of a sandbox) is kept as a template row
-- named `NAME-<content hash>` (so sandboxes start from it like from any template, and its layers
-- stay alive while the row exists), listed here with the template it belongs to.
CREATE TABLE template_versions (
    id          TEXT PRIMARY KEY,   -- the version's template row
    template    TEXT NOT NULL,      -- NAME
    parent      TEXT,               -- the version NAME pointed at before this one
    created_at  TEXT NOT NULL
);
CREATE INDEX template_versions_by_template ON template_versions (template, created_at);
-- Which version each tag of a template points at: tag `default` is row `NAME`, tag `T` row
-- `NAME:T`, each a copy of the version's row.
CREATE TABLE template_tags (
    template  TEXT NOT NULL,
    tag       TEXT NOT NULL,
    version   TEXT NOT NULL,
    PRIMARY KEY (template, tag)
);
