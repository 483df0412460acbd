//! Connections to the external engines of the scale-out mode (Redis, PostgreSQL). One concept per
//! submodule; the stores that use them live with their domain (`live`, `history`).

pub mod redis;
