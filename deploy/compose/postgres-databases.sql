-- One database per Gristmill service on the docker-compose PostgreSQL (docker-compose.yml mounts this file
-- into /docker-entrypoint-initdb.d, so the postgres image runs it once, when it initialises an empty volume).
-- Each service makes its own tables at start: it migrates its database to head with Alembic.
-- The role is POSTGRES_USER (gristmill), which owns the databases it creates here.
--
-- Idempotent: it creates only the databases that are missing, so it may be run again by hand (after a service
-- was added, for instance):
--   docker compose exec postgres psql -U gristmill -d postgres -f /docker-entrypoint-initdb.d/10-gristmill-databases.sql
SELECT format('CREATE DATABASE %I', name)
FROM unnest(ARRAY[
    'gristmill_labeling',
    'gristmill_training',
    'gristmill_registry',
    'gristmill_serving',
    'gristmill_admin'
]) AS name
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name)
\gexec
