//! [`Monitor`]: the commands a server runs, as `MONITOR` reports them.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A `MONITOR` connection (see [`RedisServer::monitor`]).
pub struct Monitor {
    reader: BufReader<TcpStream>,
}

/// One command seen by `MONITOR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitored {
    /// The sending client's address (`127.0.0.1:PORT`): one per connection.
    pub client: String,
    /// The command name, lower case (`set`, `waitaof`, ...).
    pub command: String,
    /// The arguments after the name, unescaped as far as ASCII goes.
    pub args: Vec<String>,
}

impl Monitor {
    /// Wraps a connection that has already had `+OK` for `MONITOR`.
    pub(crate) fn new(reader: BufReader<TcpStream>) -> Monitor {
        Monitor { reader }
    }

    /// Reads commands until `last(command)` is true (that one included) or `timeout` passes.
    ///
    /// # Panics
    /// When the matching command is not seen within `timeout`, with what was seen.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        last: impl Fn(&Monitored) -> bool,
    ) -> Vec<Monitored> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("MONITOR connection closed; seen: {seen:#?}"),
                Ok(_) => {
                    if let Some(m) = parse_monitor_line(line.trim_end()) {
                        let done = last(&m);
                        seen.push(m);
                        if done {
                            return seen;
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading MONITOR: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "MONITOR: the awaited command did not come within {timeout:?}; seen: {seen:#?}"
            );
        }
    }
}

/// `+1796544828.966467 [0 127.0.0.1:42584] "set" "x" "y"` -> client, command, args.
fn parse_monitor_line(line: &str) -> Option<Monitored> {
    let rest = line.strip_prefix('+')?;
    let open = rest.find('[')?;
    let close = rest[open..].find(']')? + open;
    let client = rest[open + 1..close].split_whitespace().nth(1)?.to_string();
    let mut words = Vec::new();
    let mut chars = rest[close + 1..].chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut w = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        w.push(u8::from_str_radix(&hex, 16).map_or('?', char::from));
                    }
                    Some('n') => w.push('\n'),
                    Some('r') => w.push('\r'),
                    Some('t') => w.push('\t'),
                    Some(o) => w.push(o),
                    None => break,
                },
                c => w.push(c),
            }
        }
        words.push(w);
    }
    let mut words = words.into_iter();
    let command = words.next()?.to_ascii_lowercase();
    Some(Monitored {
        client,
        command,
        args: words.collect(),
    })
}
