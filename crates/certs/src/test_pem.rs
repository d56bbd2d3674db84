//! Real PEM for the unit tests, so that every cut and every damage is done to real data: a
//! self-signed P-256 CA certificate and an empty CRL it signed, both made by openssl; a version 1
//! CRL (no extensions) from another such CA; and private keys the TLS provider refuses.

/// A CA certificate.
pub(crate) const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBjDCCATGgAwIBAgIUIJBDJcfxi5sqzElzPzB07nT+QVkwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPUGhvZW5peCBUZXN0IENBMCAXDTI2MTIwNjE0NTgxOVoYDzIx
MjYxMTEyMTQ1ODE5WjAaMRgwFgYDVQQDDA9QaG9lbml4IFRlc3QgQ0EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAASlEo0AcA6Y3nmVxHxBl/e2vfl+nZq8OHBnKqMP
yx9BNoqssum1ImfCm/6glo2ytRqxROfUuWSB78vEXn52uJOoo1MwUTAdBgNVHQ4E
FgQUzM0lvB+1tLToEj5q6Ktyt65yXYYwHwYDVR0jBBgwFoAUzM0lvB+1tLToEj5q
6Ktyt65yXYYwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEAkMQ9
ucWHFOq6VDDVHM7PU6X6Q70ZI9WcIj+S/iXRaJwCIQDtBpBOymz5X89dTd0GpQWQ
qxODTkfppWQfGIsQnceHiA==
-----END CERTIFICATE-----
";

/// An empty CRL signed by [`CERT_PEM`]'s key.
pub(crate) const CRL_PEM: &str = "-----BEGIN X509 CRL-----
MIGzMFsCAQEwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPUGhvZW5peCBUZXN0IENB
Fw0yNjEyMDYxNTAxMDhaGA8yMTI2MTExMjE1MDEwOFqgDjAMMAoGA1UdFAQDAgEB
MAoGCCqGSM49BAMCA0gAMEUCIAYszVi8szy03D++/t9TSk5/PwbMT6PmON9kVcNN
bd4MAiEAjMf9A3KEQQ4uu7Q/bihIXbH6p9znrWtkp+APHsaTRlY=
-----END X509 CRL-----
";

/// A version 1 CRL, with no extensions (`openssl ca -gencrl` without a `crlnumber` file).
pub(crate) const CRL_V1_PEM: &str = "-----BEGIN X509 CRL-----
MIGfMEgwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPUGhvZW5peCBUZXN0IENBFw0y
NjEyMDYxNjQxNDBaGA8yMTI2MTExMjE2NDE0MFowCgYIKoZIzj0EAwIDRwAwRAIg
Qxwd1akARSpbV9eeK8qnFC3f0LB/v3vkY+cdj7ejehwCIEIAr9etCW7yaknAVnp+
dJ8hmJIMv913fruvlE06gtvm
-----END X509 CRL-----
";

/// An RSA private key of 1024 bits, PKCS#8.
pub(crate) const RSA_1024_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIICeAIBADANBgkqhkiG9w0BAQEFAASCAmIwggJeAgEAAoGBAM7pZT+b7HOHgnIs
QA9uckMbpCpen8tx1DGwmjqT4Fr7K8HLCl2H7tUasS9FGIjdkEEWKbZYQ+q57/jQ
GvbDQvTrzjgxMyy3RIkGTR1GXG+BcPD4jPzbMhlEzrdl1kcrI8s6zVqFyMWfZCXH
jF1WlXk+WMQcFcKixxRLq9BX/w+BAgMBAAECgYEAlAo1oN9EvBwWXu3+H4xcQFuE
h7QQDJWyxqKelo67FR1kX1GQZv8dCGgCodmEBljQH2FmEsrwPP8wDQuIX0mxmxTf
n4Hx8h2EB0QVaMxu5zl7/ErgGQwjZ3MfwsB3yOj9/vSJ1mbpJtITp85tiUDWd9Y2
8yTS2lUUGFRGAY71p+ECQQD4F+rK9/lzQTz4C4KhzhvWmOa6b+ipq2y+/ykZ2uEe
KDC1Prt2PGYqz83kVuu34sa0i84qhe2si95qPO8aPmxtAkEA1YF+waCxkhhYUTsU
nF5DMvpAQUzDaYGWfCQELc82Ts9ADa6ey2pGFVyXNRWVWzgVFICpOgsXlICa5FBf
Ypka5QJBAN3VRPRH1pzf8Iw6fov/p5SzE1wRRJCx34LI1Q9xT2mPtj3Z4fVO/Gu7
c/aAYjUCaXp2p9oN9v8Z8b48ze9BceECQAFYcJENzzCpgJz6b1XQ7kF6/D6tGion
C+i6XWBghuoWOkQbzppfkBOAYt+NxEQv5UocyXQ5L6va5576tq8rYdUCQQDYqlAa
klENEOei80uAf2uIYA4P7aJgjRrzrBOSZBPQmJ+qdamztnT6XcFf0VUaSmBcTX7A
mGvAIDJ3FnFXsGoo
-----END PRIVATE KEY-----
";

/// An Ed448 private key, PKCS#8.
pub(crate) const ED448_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MEcCAQAwBQYDK2VxBDsEOZOtCK9vxC+Bl2E5Tbm8MlidV/SO1d4+PV65JetowRQn
reGVRmhPQOrx9CmjxsZfuo3FobJ5ysGE6Q==
-----END PRIVATE KEY-----
";

/// A P-256 private key, PKCS#8: one the provider signs with.
pub(crate) const P256_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgsyQkTz+NWG8xfgDw
56OJfCBZjXU2hKnyEX5ShU6JDHqhRANCAATvRPRGg6dlNUqklVJGaZxG/dpTBnpU
iN72liH0G1olhpi0RR5yrpW4jyh1W9tQrgdPNYT3KHt8wQhIPEhJ6k9M
-----END PRIVATE KEY-----
";
