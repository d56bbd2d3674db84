//! Certificates over their life, on both sides: rotated while traffic flows (`rotation`), revoked or
//! removed from `allowed_peers` while running (`revocation`), coming to their end (`expiry`), and
//! what both do to connections already established (`live_connections`).
//! Which certificates are refused outright is in `identity`; start-up checks in
//! `operations::startup`.

mod expiry;
mod live_connections;
mod revocation;
mod rotation;
