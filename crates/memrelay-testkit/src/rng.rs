//! Random choices: fastrand's generator (wyrand) seeded by the caller, so
//! a run's choices follow from its seed (memrelay-chaos's `--seed`, a
//! test's constant). Thread timing still varies from run to run.

#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.u64(0..n.max(1))
    }
}
