//! Certificates over their life, on both sides: rotated while traffic flows (`rotation`), revoked or
//! removed from `allowed_peers` while running (`revocation`), and coming to their end (`expiry`).
//! Which certificates are refused outright is in `identity`; start-up checks in
//! `operations::startup`.

mod expiry;
mod revocation;
mod rotation;
