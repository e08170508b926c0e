-- The build each template row was made by, as E2B's SDK names builds (a UUID): the tags of a
-- template built through the SDK are rows `name` (tag `default`) and `name:tag`, and list with
-- the build that made them.
CREATE TABLE template_builds (
    name      TEXT PRIMARY KEY,   -- the template row
    build_id  TEXT NOT NULL
);
