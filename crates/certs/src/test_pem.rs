//! Real PEM for the unit tests, so that every cut and every damage is done to real data: a
//! self-signed P-256 CA certificate and an empty CRL it signed, both made by openssl.

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
