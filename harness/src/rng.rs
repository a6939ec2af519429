//! [`Rng`]: deterministic pseudo-random data for tests and benches.

/// Tiny xorshift64* PRNG, deterministic per seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `len` pseudo-random ASCII letters and digits (barely compressible).
    pub fn text(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut s = String::with_capacity(len);
        while s.len() < len {
            let mut x = self.next_u64();
            for _ in 0..8 {
                if s.len() == len {
                    break;
                }
                s.push(ALPHABET[(x & 0xff) as usize % ALPHABET.len()] as char);
                x >>= 8;
            }
        }
        s
    }
}
