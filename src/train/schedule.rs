//! The reference learning-rate schedule: step decay at 50% and 75% of training.

/// Learning rate of `epoch` (counted from 0) out of `epochs`: `base`, divided by 10 once the
/// epoch reaches 50% of `epochs` and by 100 once it reaches 75%. The reference's
/// `adjust_learning_rate` hard-codes epochs 150 and 225, which are these for 300 epochs.
pub fn learning_rate(base: f64, epoch: usize, epochs: usize) -> f64 {
    let (first, second) = milestones(epochs);
    base * 0.1f64.powi((epoch >= first) as i32 + (epoch >= second) as i32)
}

/// The first epochs at 50% and at 75% of `epochs`.
pub fn milestones(epochs: usize) -> (usize, usize) {
    (epochs.div_ceil(2), (epochs as u128 * 3).div_ceil(4) as usize)
}

/// The learning-rate drops a run from epoch `start` to `epochs` (exclusive) will make, as
/// words: `/10 at epochs 150 and 225`, `/10 at epoch 225`, or `no drop left` (a drop at
/// `start` itself has happened already: the run starts at the lower rate).
pub fn drops(start: usize, epochs: usize) -> String {
    let (first, second) = milestones(epochs);
    let mut ahead: Vec<usize> = [first, second].into_iter().filter(|&m| m > start && m < epochs).collect();
    ahead.dedup();
    match ahead[..] {
        [] => "no drop left".into(),
        [m] => format!("/10 at epoch {m}"),
        [a, b] => format!("/10 at epochs {a} and {b}"),
        _ => unreachable!("two milestones"),
    }
}

/// A learning rate as printed: rounded to 9 decimals, so that 0.1 / 10 prints as 0.01, not
/// 0.010000000000000002.
pub fn shown(lr: f64) -> f64 {
    (lr * 1e9).round() / 1e9
}

/// What changing the epochs of a run from `old` to `new` (and its base learning rate from
/// `old_lr` to `new_lr`) at epoch `start` does to its schedule, as words: the milestones move
/// with the epochs, so the learning rate of `start` can change, back up included. A run
/// extended after its last epoch compares with that epoch.
pub fn moved(old_lr: f64, new_lr: f64, start: usize, old: usize, new: usize) -> String {
    let ((a0, b0), (a1, b1)) = (milestones(old), milestones(new));
    let last = start.min(old.saturating_sub(1));
    let (before, after) = (shown(learning_rate(old_lr, last, old)), shown(learning_rate(new_lr, start, new)));
    let mut rate = match (last == start, after == before) {
        (true, true) => format!("epoch {start} keeps lr {after}"),
        (true, false) => format!("epoch {start} trains at lr {after} instead of {before}"),
        (false, true) => format!("epoch {start} trains at lr {after}, as epoch {last} did"),
        (false, false) => format!("epoch {start} trains at lr {after}; epoch {last} trained at {before}"),
    };
    if after > before {
        rate += ": back up, a drop already made is undone";
    }
    format!("the LR milestones (50% and 75% of the epochs) move from epochs {a0} and {b0} to {a1} and {b1}; {rate}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_epochs_says_where_the_milestones_go() {
        assert_eq!(
            moved(0.1, 0.1, 100, 300, 400),
            "the LR milestones (50% and 75% of the epochs) move from epochs 150 and 225 to 200 and 300; epoch 100 keeps lr 0.1"
        );
        let back_up = moved(0.1, 0.1, 160, 300, 400);
        assert!(back_up.ends_with("epoch 160 trains at lr 0.1 instead of 0.01: back up, a drop already made is undone"));
        assert!(moved(0.1, 0.1, 160, 400, 300).ends_with("epoch 160 trains at lr 0.01 instead of 0.1"), "shortened");
        // A finished run extended: compared with its last epoch.
        assert!(moved(0.1, 0.1, 300, 300, 400).ends_with("epoch 300 trains at lr 0.001, as epoch 299 did"));
        // A new base rate too: each schedule with its own.
        assert!(moved(0.1, 0.05, 1, 1, 2).ends_with("epoch 1 trains at lr 0.005; epoch 0 trained at 0.1"));
        let undone = moved(0.1, 0.1, 300, 300, 600);
        assert!(undone.ends_with(
            "epoch 300 trains at lr 0.01; epoch 299 trained at 0.001: back up, a drop already made is undone"
        ));
    }

    #[test]
    fn only_drops_ahead_are_listed() {
        assert_eq!(drops(0, 300), "/10 at epochs 150 and 225");
        assert_eq!(drops(150, 300), "/10 at epoch 225");
        assert_eq!(drops(200, 300), "/10 at epoch 225");
        assert_eq!(drops(225, 300), "no drop left");
        assert_eq!(drops(0, 1), "no drop left");
        assert_eq!(drops(0, 2), "/10 at epoch 1");
        assert_eq!(drops(0, 4), "/10 at epochs 2 and 3");
    }

    #[test]
    fn reference_milestones() {
        let lr = |e| learning_rate(0.1, e, 300) as f32;
        assert_eq!([lr(0), lr(149), lr(150), lr(224), lr(225), lr(299)], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]);
    }

    #[test]
    fn milestones_scale_with_epochs() {
        let lrs: Vec<f32> = (0..10).map(|e| learning_rate(1.0, e, 10) as f32).collect();
        assert_eq!(lrs, [1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01]);
        assert_eq!(learning_rate(1.0, 0, 2) as f32, 1.0);
        assert_eq!(learning_rate(1.0, 1, 2) as f32, 0.1);
        assert_eq!(learning_rate(1.0, 0, 1) as f32, 1.0, "a one-epoch run trains at the base rate");
    }
}
