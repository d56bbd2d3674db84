//! HTTP/2 driven with the `h2` crate directly: the protocol ([`client`]: a stream per request, its
//! body) apart from the policy that decides which connection a request rides ([`shared`]).

pub mod client;
pub mod shared;
