//! A small seeded random generator for plugins (SplitMix64). Results must be reproducible from
//! the run seed, and some libraries' generators cannot be seeded (candle's CPU RNG), so plugins
//! draw initial weights, shuffles, negatives and dropout masks from this, seeded with
//! [`Host::seed`](crate::Host::seed).

/// SplitMix64: fast, statistically sound for sampling, trivially seedable.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    /// The generator's whole state: `SeededRng::new(rng.state())` continues the same stream,
    /// so a checkpointed fit resumes exactly where it stopped.
    pub fn state(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 32) * n as u64 >> 32) as usize
    }

    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for k in (1..items.len()).rev() {
            items.swap(k, self.below(k + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_roughly_uniform() {
        let (mut a, mut b) = (SeededRng::new(9), SeededRng::new(9));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[a.below(10)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        let mean = (0..100_000).map(|_| a.normal()).sum::<f64>() / 100_000.0;
        assert!(mean.abs() < 0.02, "{mean}");
    }
}
