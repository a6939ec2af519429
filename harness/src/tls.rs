//! TLS test material: a throwaway CA, a server certificate for `127.0.0.1` and `localhost`, a
//! client certificate, and a second CA that signed nothing here (to test a wrong trust anchor),
//! all generated with the `openssl` command in a temporary directory; and a `redis-server`
//! serving TLS with them.
//!
//! Keys are EC P-256 (fast to generate), written as PKCS#8 PEM, valid for two days. The
//! `openssl` binary must be installed: when it is missing the tests that need it FAIL with a
//! message saying how to install it; they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::RedisServer;

/// Extensions of the CA: may sign certificates, nothing else.
const CA_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = graphrag-kv test CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

/// Extensions of the server certificate. `clientAuth` too: redis-server presents the same
/// certificate when it connects to other nodes (replication, cluster bus).
const SERVER_EXT: &str = "\
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
";

/// Extensions of the client certificate.
const CLIENT_EXT: &str = "\
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";

/// A temporary directory of PEM files: `ca.crt`, `server.{crt,key}`, `client.{crt,key}`,
/// `other-ca.crt`. Removed when dropped.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generates a fresh set; panics (never skips) when `openssl` is missing or fails.
    pub fn generate() -> TestCerts {
        let dir = tempfile::Builder::new()
            .prefix("graphrag-kv-tls-")
            .tempdir()
            .expect("creating a temporary directory for test certificates");
        let d = dir.path();
        std::fs::write(d.join("ca.cnf"), CA_CONFIG).unwrap();
        std::fs::write(d.join("server.ext"), SERVER_EXT).unwrap();
        std::fs::write(d.join("client.ext"), CLIENT_EXT).unwrap();
        // A different name for the other CA: with the same name the handshake would fail on
        // the signature rather than on the unknown issuer.
        std::fs::write(
            d.join("other-ca.cnf"),
            CA_CONFIG.replace("graphrag-kv test CA", "graphrag-kv unrelated CA"),
        )
        .unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-config",
                    &format!("{ca}.cnf"),
                    "-extensions",
                    "v3_ca",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                    "-days",
                    "2",
                ],
            );
        }
        for (name, cn, serial) in [
            ("server", "localhost", "1001"),
            ("client", "graphrag-kv test client", "1002"),
        ] {
            openssl(
                d,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    serial,
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.crt"),
                ],
            );
        }
        TestCerts { dir }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the server and client certificates.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA that signed nothing here: trusting only it must fail the handshake.
    pub fn other_ca_cert(&self) -> PathBuf {
        self.dir.path().join("other-ca.crt")
    }

    /// The server's certificate (SAN `127.0.0.1`, `localhost`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// The server's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client's certificate, for mutual TLS.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

/// Runs `openssl args` in `dir`; panics with its output when it fails or is missing.
fn openssl(dir: &Path, args: &[&str]) {
    let out = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "openssl not found: the TLS tests generate their certificates with it; install it \
             (apt-get install openssl)"
        ),
        Err(e) => panic!("cannot run openssl: {e}"),
    };
    assert!(
        out.status.success(),
        "openssl {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_arg(p: &Path) -> String {
    p.to_str()
        .expect("temporary directory paths are UTF-8")
        .to_string()
}

/// Whether the server asks for a client certificate (`--tls-auth-clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Never asks (`no`).
    No,
    /// Asks; a client without a certificate is still accepted (`optional`).
    Optional,
    /// A client must present a certificate signed by the CA (`yes`, mutual TLS).
    Required,
}

impl ClientAuth {
    fn arg(self) -> &'static str {
        match self {
            ClientAuth::No => "no",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "yes",
        }
    }
}

/// A `redis-server` serving TLS on `tls_port` with certificates from [`TestCerts`].
///
/// It keeps a plain-text port too, on loopback, for the readiness check and for the tests'
/// administrative connections ([`TlsRedisServer::server`]); the store under test only ever
/// gets the `rediss://` URL.
pub struct TlsRedisServer {
    server: RedisServer,
    tls_port: u16,
    certs: Arc<TestCerts>,
}

impl TlsRedisServer {
    /// Generates certificates and starts a server with them; `extra_args` come last.
    pub fn start(auth: ClientAuth, extra_args: &[&str]) -> TlsRedisServer {
        TlsRedisServer::start_with_certs(Arc::new(TestCerts::generate()), auth, extra_args)
    }

    /// Starts a server with existing certificates (several servers of one CA).
    pub fn start_with_certs(
        certs: Arc<TestCerts>,
        auth: ClientAuth,
        extra_args: &[&str],
    ) -> TlsRedisServer {
        // The TLS port is chosen before the server starts and another process may take it
        // meanwhile: then RedisServer gives up with a panic, and a new port is tried.
        let mut last = String::new();
        for _ in 0..5 {
            let tls_port = crate::free_port();
            let owned: Vec<String> = vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                path_arg(&certs.server_cert()),
                "--tls-key-file".into(),
                path_arg(&certs.server_key()),
                "--tls-ca-cert-file".into(),
                path_arg(&certs.ca_cert()),
                "--tls-auth-clients".into(),
                auth.arg().into(),
            ];
            let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
            args.extend_from_slice(extra_args);
            match std::panic::catch_unwind(|| RedisServer::start_with(&args)) {
                Ok(server) => {
                    return TlsRedisServer {
                        server,
                        tls_port,
                        certs,
                    }
                }
                Err(p) => {
                    last = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    if !last.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("redis-server with TLS did not start: {last}");
    }

    /// `rediss://127.0.0.1:TLS_PORT`.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }

    /// `rediss://localhost:TLS_PORT` (checks the certificate's DNS name instead of its IP).
    pub fn tls_url_localhost(&self) -> String {
        format!("rediss://localhost:{}", self.tls_port)
    }

    /// The TLS port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The underlying server, for plain-text administrative connections (`conn()`).
    pub fn server(&self) -> &RedisServer {
        &self.server
    }

    /// The certificates the server uses.
    pub fn certs(&self) -> &TestCerts {
        &self.certs
    }
}

/// Masters of a Redis Cluster that talks TLS to clients and between nodes (`--tls-cluster
/// yes`), one CA for all. Each node keeps a plain-text port for the tests' own checks; a TLS
/// client is told the nodes' TLS ports (CLUSTER SLOTS / NODES answer per connection type).
pub struct TlsCluster {
    nodes: Vec<TlsRedisServer>,
}

impl TlsCluster {
    /// `masters` masters sharing the 16384 slots; returns once every node says
    /// `cluster_state:ok` and knows every other. Panics with the nodes' view after ~30 s.
    pub fn start(masters: usize) -> TlsCluster {
        assert!(masters >= 1);
        let certs = Arc::new(TestCerts::generate());
        let nodes: Vec<TlsRedisServer> = (0..masters)
            .map(|_| {
                // The bus port is given explicitly, so no `port + 10000` rule applies.
                let bus = crate::free_port().to_string();
                TlsRedisServer::start_with_certs(
                    certs.clone(),
                    ClientAuth::No,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                    ],
                )
            })
            .collect();
        let per = 16384 / masters;
        for (i, node) in nodes.iter().enumerate() {
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let mut conn = node.server().conn();
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(i * per)
                .arg(last)
                .query::<()>(&mut conn)
                .expect("CLUSTER ADDSLOTSRANGE");
            let _ = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query::<()>(&mut conn);
        }
        let first = &nodes[0];
        let first_bus = cluster_bus_port(first);
        for node in &nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(first.tls_port())
                .arg(first_bus)
                .query::<()>(&mut node.server().conn())
                .expect("CLUSTER MEET");
        }
        let cluster = TlsCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let views: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| {
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query::<String>(&mut n.server().conn())
                        .unwrap_or_else(|e| e.to_string())
                })
                .collect();
            let healthy = views.iter().all(|info| {
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{masters}\r"))
            });
            if healthy {
                return cluster;
            }
            if Instant::now() >= deadline {
                panic!("the TLS cluster did not become healthy: {views:#?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The seed URLs, `rediss://127.0.0.1:TLS_PORT` of every node, comma-separated.
    pub fn tls_url_list(&self) -> String {
        self.nodes
            .iter()
            .map(TlsRedisServer::tls_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes.
    pub fn nodes(&self) -> &[TlsRedisServer] {
        &self.nodes
    }

    /// The CA and client certificates of every node.
    pub fn certs(&self) -> &TestCerts {
        self.nodes[0].certs()
    }
}

/// The `--cluster-port` a node was started with (`CONFIG GET cluster-port`).
fn cluster_bus_port(node: &TlsRedisServer) -> u16 {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("cluster-port")
        .query(&mut node.server().conn())
        .expect("CONFIG GET cluster-port");
    pair.get(1)
        .and_then(|p| p.parse().ok())
        .expect("a cluster-port")
}
