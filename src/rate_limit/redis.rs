//! The limiter in Redis: one script per acquisition, the same arithmetic as [`super::gcra`].

use std::sync::Arc;
use std::time::Duration;

use super::gcra::Quota;
use super::{Admission, RateLimit, RateLimiter};
use crate::backend::redis::RedisShared;
use crate::error::Result;

/// The limiter in the Redis of a [`crate::Storage`], through its pool (TLS, Sentinel, cluster
/// and ACL user as configured): every process using the same Redis and key prefix shares the
/// budget. Keys are `{prefix}::rate:{name}` (see the [module docs](super#keys)).
///
/// A command retried after a lost reply may charge one request twice: the fleet then sends a
/// little less, never more.
#[derive(Debug)]
pub struct RedisRateLimiter {
    shared: Arc<RedisShared>,
}

impl RedisRateLimiter {
    /// A limiter in the Redis of `shared`.
    pub fn new(shared: Arc<RedisShared>) -> RedisRateLimiter {
        RedisRateLimiter { shared }
    }

    fn key_of(&self, name: &str) -> String {
        format!("{}::rate:{name}", self.shared.config().key_prefix)
    }

    fn run(&self, name: &str, args: &[String]) -> Result<Vec<i64>> {
        let mut cmd = redis::cmd("EVAL");
        // EVAL, not EVALSHA: no SCRIPT LOAD, which a cluster would send to another node than
        // the key's; the script is short and Redis caches its compiled form.
        cmd.arg(SCRIPT).arg(1).arg(self.key_of(name));
        for a in args {
            cmd.arg(a);
        }
        self.shared
            .with_conn("rate_limit", "::rate", |c| cmd.query(c))
    }
}

/// `f64` as the script reads it back exactly (Lua numbers are doubles).
fn num(x: f64) -> String {
    format!("{x:.3}")
}

/// Milliseconds the key must outlive its state by: one period, so an idle limiter is
/// forgotten a period after its budget is whole again.
fn period_ms(limit: &RateLimit) -> String {
    (limit.period.as_millis().max(1) as u64).to_string()
}

impl RateLimiter for RedisRateLimiter {
    fn try_acquire(&self, name: &str, limit: &RateLimit, tokens: u64) -> Result<Admission> {
        let q = Quota::of(limit);
        let r = self.run(
            name,
            &[
                "acquire".into(),
                num(q.request_interval),
                num(q.request_capacity),
                num(q.token_interval),
                num(q.token_capacity),
                tokens.to_string(),
                period_ms(limit),
            ],
        )?;
        Ok(match r.as_slice() {
            [1, ..] => Admission::Admitted,
            [_, wait, cooling, ..] => Admission::Wait {
                wait: Duration::from_micros((*wait).max(1) as u64),
                cooling: *cooling == 1,
            },
            _ => Admission::Wait {
                wait: Duration::from_millis(1),
                cooling: false,
            },
        })
    }

    fn adjust_tokens(&self, name: &str, limit: &RateLimit, delta: i64) -> Result<()> {
        let q = Quota::of(limit);
        if q.token_interval == 0.0 || delta == 0 {
            return Ok(());
        }
        self.run(
            name,
            &[
                "adjust".into(),
                num(q.token_interval),
                delta.to_string(),
                period_ms(limit),
            ],
        )?;
        Ok(())
    }

    fn cool_down(&self, name: &str, limit: &RateLimit, pause: Duration) -> Result<bool> {
        let q = Quota::of(limit);
        let r = self.run(
            name,
            &[
                "cool".into(),
                (pause.as_micros() as u64).to_string(),
                num(q.request_interval),
                num(q.request_capacity),
                period_ms(limit),
            ],
        )?;
        Ok(r.first() == Some(&1))
    }

    fn key(&self, name: &str) -> Option<String> {
        Some(self.key_of(name))
    }
}

/// The three operations on one hash `{req, tok, cool}`; times in µs of the server's `TIME`.
/// Numbers are written with `%.0f`: Lua's own `tostring` keeps 14 digits, and these have 16.
/// Replies: `{admitted, wait_us, cooling}` for `acquire`, `{set}` for `cool`, `{1}` for
/// `adjust`.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k = KEYS[1]
local op = ARGV[1]
local function save(field, value) redis.call('HSET', k, field, string.format('%.0f', math.ceil(value))) end
local function expire(period_ms)
  local v = redis.call('HMGET', k, 'req', 'tok', 'cool')
  local last = now
  for i = 1, 3 do last = math.max(last, tonumber(v[i]) or 0) end
  redis.call('PEXPIRE', k, math.ceil((last - now) / 1000) + tonumber(period_ms))
end
if op == 'acquire' then
  local ri, rc, ti, tc, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local v = redis.call('HMGET', k, 'req', 'tok', 'cool')
  local cool = tonumber(v[3]) or 0
  if cool > now then return {0, math.ceil(cool - now), 1} end
  local wait = 0
  local rnew, tnew
  if ri > 0 then
    rnew = math.max(tonumber(v[1]) or 0, now) + ri
    wait = math.max(wait, rnew - math.max(rc, ri) - now)
  end
  if ti > 0 and cost > 0 then
    tnew = math.max(tonumber(v[2]) or 0, now) + ti * cost
    wait = math.max(wait, tnew - math.max(tc, ti * cost) - now)
  end
  if wait > 0 then return {0, math.ceil(wait), 0} end
  if rnew then save('req', rnew) end
  if tnew then save('tok', tnew) end
  if rnew or tnew then expire(ARGV[7]) end
  return {1, 0, 0}
elseif op == 'adjust' then
  local ti, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
  local tat = math.max(tonumber(redis.call('HGET', k, 'tok')) or 0, now)
  save('tok', math.max(tat + ti * delta, now))
  expire(ARGV[4])
  return {1}
elseif op == 'cool' then
  local pause, ri, rc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local v = redis.call('HMGET', k, 'req', 'cool')
  if (tonumber(v[2]) or 0) > now then return {0} end
  local untl = now + pause
  save('cool', untl)
  if ri > 0 then save('req', math.max(tonumber(v[1]) or 0, untl + rc - ri)) end
  expire(ARGV[5])
  return {1}
end
return redis.error_reply('unknown rate limit operation')
"#;
