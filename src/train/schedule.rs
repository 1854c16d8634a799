//! The reference learning-rate schedule: step decay at 50% and 75% of training.

/// Learning rate of `epoch` (counted from 0) out of `epochs`: `base`, divided by 10 from epoch
/// floor(epochs / 2) and by 100 from floor(3 * epochs / 4). The reference's
/// `adjust_learning_rate` hard-codes epochs 150 and 225, which are these for 300 epochs.
pub fn learning_rate(base: f64, epoch: usize, epochs: usize) -> f64 {
    [epochs / 2, 3 * epochs / 4].iter().filter(|&&milestone| epoch >= milestone).fold(base, |lr, _| lr * 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_milestones() {
        let lr = |e| learning_rate(0.1, e, 300) as f32;
        assert_eq!([lr(0), lr(149), lr(150), lr(224), lr(225), lr(299)], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]);
        // As the reference computes it: 0.1 * 0.1 ** (e // 150) * 0.1 ** (e // 225), in f64.
        assert_eq!(learning_rate(0.1, 299, 300), 0.1 * 0.1 * 0.1);
    }

    #[test]
    fn milestones_scale_with_epochs_and_round_down() {
        let lrs: Vec<f32> = (0..10).map(|e| learning_rate(1.0, e, 10) as f32).collect();
        assert_eq!(lrs, [1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]);
        assert_eq!(learning_rate(1.0, 0, 2) as f32, 1.0);
        assert_eq!(learning_rate(1.0, 1, 2) as f32, 0.01);
        assert_eq!(learning_rate(1.0, 0, 1) as f32, 0.01);
    }
}
