//! Running averages weighted by batch size (the reference's `AverageMeter`).

/// The last value and the running average of a per-batch quantity.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Meter {
    last: f64,
    sum: f64,
    count: usize,
}

impl Meter {
    /// Records `value`, the mean over a batch of `n` items.
    pub fn update(&mut self, value: f64, n: usize) {
        self.last = value;
        self.sum += value * n as f64;
        self.count += n;
    }

    /// The most recent value.
    pub fn last(&self) -> f64 {
        self.last
    }

    /// The mean over every item recorded (0 before any).
    pub fn avg(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_by_batch_size() {
        let mut m = Meter::default();
        assert_eq!(m.avg(), 0.0);
        m.update(1.0, 3);
        m.update(3.0, 1);
        assert_eq!((m.last(), m.avg()), (3.0, 1.5));
    }
}
