//! Security against real redis-server processes: a restricted ACL user (standalone and
//! cluster), TLS with a private CA and mutual TLS, secrets kept out of every log record (trace
//! level included), error and `Debug` output, and stored data that is only ever parsed.
//!
//! docs/SECURITY.md states each guarantee and points at the test here that proves it. By
//! topic: `acl`, `tls`, `secrets`, `untrusted`; `logs` captures every log record, `helpers`
//! builds configurations.

#[path = "../support/mod.rs"]
mod support;

mod acl;
mod helpers;
mod logs;
mod secrets;
mod tls;
mod untrusted;

use acl::{acl_backend_env, acl_backend_url};
use tls::tls_backend;

// The whole conformance suite as the restricted user, credentials from REDIS_USERNAME /
// REDIS_PASSWORD, then from the URL; each test ends by checking the server's ACL LOG.
support::conformance::conformance_tests!(acl_env_credentials, acl_backend_env);
support::conformance::conformance_tests!(acl_url_credentials, acl_backend_url);

// The whole conformance suite over `rediss://`, trusting only the test CA.
support::conformance::conformance_tests!(tls_private_ca, tls_backend);
