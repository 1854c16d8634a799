//! An epoch's batches, prepared by a loader thread one batch ahead of training.
//!
//! The thread and two batch buffers live as long as the [`Loader`]: buffers go to the thread
//! through a channel of empty ones, come back full through a channel of capacity 1, and are
//! recycled, so a running epoch allocates nothing. The order of an epoch is a Fisher-Yates
//! shuffle keyed by (seed, epoch), starting from the identity each epoch, so any epoch's batches
//! can be regenerated on their own.

use super::augment::{normalization, random_crop};
use super::cifar::{Dataset, Images, IMAGE_BYTES, SIDE};
use crate::input::{Crop, Input, Normalize};
use crate::{bail, rng, Error, Result};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;

/// Stream tag of the shuffles.
const TAG: u64 = u64::from_be_bytes(*b"shuffle\0");

/// Batch buffers in circulation: one being trained on, one being filled.
const BUFFERS: usize = 2;

/// One batch: stored images [n, 3, 32, 32] with the crop window of each (the backend crops,
/// flips and normalizes them, and upsamples them to a larger model's size, on the device for
/// the CUDA backend), and their labels.
#[derive(Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    crops: Vec<Crop>,
    labels: Vec<u32>,
    norm: Normalize,
}

impl Batch {
    /// The images as the model takes them.
    pub fn input(&self) -> Input<'_> {
        Input::Stored { bytes: &self.bytes, h: SIDE, w: SIDE, crops: &self.crops, norm: &self.norm }
    }

    /// Labels, one per image.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Shuffles `order` in place (Fisher-Yates), keyed by `seed` and `epoch`.
pub fn shuffle(order: &mut [u32], seed: u64, epoch: u64) {
    let key = rng::derive(rng::derive(seed, TAG), epoch);
    for i in (1..order.len()).rev() {
        // Uniform in 0..=i from 64 random bits (multiply-shift).
        let j = ((rng::derive(key, i as u64) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
}

/// What the loader thread does with its images.
struct Worker {
    data: Arc<Images>,
    batch: usize,
    /// Shuffle seed; `None` keeps the stored order.
    shuffle: Option<u64>,
    /// Augmentation seed; `None` passes images through unchanged.
    augment: Option<u64>,
}

impl Worker {
    /// Serves epochs until the loader is dropped.
    fn run(self, epochs: Receiver<u64>, free: Receiver<Batch>, full: SyncSender<Batch>) {
        let n = self.data.len();
        let mut order: Vec<u32> = Vec::with_capacity(n);
        while let Ok(epoch) = epochs.recv() {
            order.clear();
            order.extend(0..n as u32);
            if let Some(seed) = self.shuffle {
                shuffle(&mut order, seed, epoch);
            }
            for indices in order.chunks(self.batch) {
                let Ok(mut batch) = free.recv() else { return };
                self.fill(&mut batch, indices, epoch);
                if full.send(batch).is_err() {
                    return;
                }
            }
        }
    }

    fn fill(&self, batch: &mut Batch, indices: &[u32], epoch: u64) {
        batch.labels.clear();
        batch.labels.extend(indices.iter().map(|&i| self.data.labels()[i as usize]));
        batch.bytes.clear();
        batch.crops.clear();
        for &i in indices {
            let i = i as usize;
            batch.bytes.extend_from_slice(self.data.image(i));
            batch.crops.push(self.augment.map_or(Crop::NONE, |seed| random_crop(seed, epoch, i)));
        }
    }
}

/// Batches of a set of images, prepared on a loader thread. The thread ends when the loader
/// is dropped.
pub struct Loader {
    images: usize,
    batch: usize,
    epochs: Sender<u64>,
    free: SyncSender<Batch>,
    full: Receiver<Batch>,
}

impl Loader {
    /// Training batches: shuffled each epoch and, when `augment`, randomly cropped and flipped,
    /// both deterministic from `seed`.
    pub fn train(data: Arc<Images>, dataset: Dataset, batch: usize, seed: u64, augment: bool) -> Result<Loader> {
        Loader::start(data, dataset, batch, Some(seed), augment.then_some(seed))
    }

    /// Test batches: the stored order, never augmented.
    pub fn test(data: Arc<Images>, dataset: Dataset, batch: usize) -> Result<Loader> {
        Loader::start(data, dataset, batch, None, None)
    }

    fn start(
        data: Arc<Images>,
        dataset: Dataset,
        batch: usize,
        shuffle: Option<u64>,
        augment: Option<u64>,
    ) -> Result<Loader> {
        if batch == 0 || data.is_empty() {
            bail!("a loader needs images ({}) and a batch size ({batch})", data.len());
        }
        let (epochs, epochs_rx) = mpsc::channel();
        let (free, free_rx) = mpsc::sync_channel(BUFFERS);
        let (full_tx, full) = mpsc::sync_channel(1);
        let images = data.len();
        let worker = Worker { data, batch, shuffle, augment };
        std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || worker.run(epochs_rx, free_rx, full_tx))
            .map_err(|e| Error(format!("cannot start the data loader thread: {e}")))?;
        let capacity = batch.min(images);
        for _ in 0..BUFFERS {
            let buffer = Batch {
                bytes: Vec::with_capacity(capacity * IMAGE_BYTES),
                crops: Vec::with_capacity(capacity),
                labels: Vec::with_capacity(capacity),
                norm: normalization(dataset),
            };
            free.send(buffer).map_err(|_| stopped())?;
        }
        Ok(Loader { images, batch, epochs, free, full })
    }

    /// Batches per epoch (the last one may be partial).
    pub fn batches(&self) -> usize {
        self.images.div_ceil(self.batch)
    }

    /// Starts epoch `epoch`: its batches are produced while the previous ones are used.
    pub fn epoch(&mut self, epoch: u64) -> Result<Epoch<'_>> {
        self.epochs.send(epoch).map_err(|_| stopped())?;
        Ok(Epoch { left: self.batches(), loader: self, current: None })
    }
}

/// The batches of one epoch, in order. Dropping it early discards the rest of the epoch.
pub struct Epoch<'a> {
    loader: &'a mut Loader,
    left: usize,
    current: Option<Batch>,
}

impl Epoch<'_> {
    /// The next batch (the previous one goes back to the loader), or `None` at the end.
    pub fn next_batch(&mut self) -> Result<Option<&Batch>> {
        self.recycle();
        if self.left == 0 {
            return Ok(None);
        }
        let batch = self.loader.full.recv().map_err(|_| stopped())?;
        self.left -= 1;
        Ok(Some(self.current.insert(batch)))
    }

    fn recycle(&mut self) {
        if let Some(batch) = self.current.take() {
            // Never blocks: the channel holds every buffer. Fails only if the thread is gone,
            // which the next receive reports.
            let _ = self.loader.free.send(batch);
        }
    }
}

impl Drop for Epoch<'_> {
    fn drop(&mut self) {
        while self.next_batch().is_ok_and(|b| b.is_some()) {}
    }
}

fn stopped() -> Error {
    Error("the data loader thread stopped unexpectedly".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_permutation(order: &[u32]) -> bool {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        sorted.iter().enumerate().all(|(i, &v)| v as usize == i)
    }

    fn shuffled(n: u32, seed: u64, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..n).collect();
        shuffle(&mut order, seed, epoch);
        order
    }

    #[test]
    fn shuffles_are_permutations_that_differ_per_epoch_and_repeat_per_seed() {
        let a = shuffled(1000, 5, 0);
        assert!(is_permutation(&a));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled(1000, 5, 0));
        assert_ne!(a, shuffled(1000, 5, 1));
        assert_ne!(a, shuffled(1000, 6, 0));
        assert_eq!(shuffled(1, 5, 0), [0]);
        assert!(shuffled(0, 5, 0).is_empty());
    }

    #[test]
    fn shuffle_is_unbiased_enough() {
        // Where element 0 lands over many epochs: every position about equally often.
        let mut hits = [0usize; 8];
        for e in 0..8000 {
            hits[shuffled(8, 1, e).iter().position(|&v| v == 0).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| (850..1150).contains(&h)), "{hits:?}");
    }

    /// (label, first byte) of every image of an epoch, and the batch sizes; no image is
    /// cropped.
    fn epoch(loader: &mut Loader, e: u64) -> (Vec<(u32, u8)>, Vec<usize>) {
        let (mut seen, mut sizes) = (Vec::new(), Vec::new());
        let mut batches = loader.epoch(e).unwrap();
        while let Some(b) = batches.next_batch().unwrap() {
            assert_eq!((b.bytes.len(), b.crops.len()), (b.len() * IMAGE_BYTES, b.len()));
            assert!(b.crops.iter().all(|&c| c == Crop::NONE));
            sizes.push(b.len());
            for (img, &l) in b.bytes.chunks_exact(IMAGE_BYTES).zip(b.labels()) {
                // Image i has every byte i.
                seen.push((l, img[0]));
            }
        }
        (seen, sizes)
    }

    #[test]
    fn test_loader_yields_every_image_in_order_with_a_partial_last_batch() {
        let data = Arc::new(crate::testing::images(Dataset::Cifar10, 37));
        let mut loader = Loader::test(data, Dataset::Cifar10, 16).unwrap();
        assert_eq!(loader.batches(), 3);
        for e in 0..2 {
            let (seen, sizes) = epoch(&mut loader, e);
            assert_eq!(sizes, [16, 16, 5]);
            let expect: Vec<(u32, u8)> = (0..37).map(|i| (i % 10, i as u8)).collect();
            assert_eq!(seen, expect);
        }
    }

    #[test]
    fn train_loader_shuffles_each_epoch_and_survives_an_abandoned_epoch() {
        let data = Arc::new(crate::testing::images(Dataset::Cifar10, 37));
        let mut loader = Loader::train(data.clone(), Dataset::Cifar10, 8, 3, false).unwrap();
        let (first, sizes) = epoch(&mut loader, 0);
        assert_eq!(sizes, [8, 8, 8, 8, 5]);
        let order: Vec<u32> = first.iter().map(|&(_, i)| i.into()).collect();
        assert!(is_permutation(&order));
        assert_eq!(order, shuffled(37, 3, 0));
        assert!(first.iter().all(|&(l, i)| l == u32::from(i) % 10));
        {
            let mut abandoned = loader.epoch(1).unwrap();
            abandoned.next_batch().unwrap();
        }
        let (second, _) = epoch(&mut loader, 1);
        assert_ne!(first, second);
        let mut again = Loader::train(data, Dataset::Cifar10, 8, 3, false).unwrap();
        assert_eq!(epoch(&mut again, 1).0, second);
    }

    #[test]
    fn augmented_batches_follow_the_crop_draws() {
        let data = Arc::new(crate::testing::images(Dataset::Cifar10, 5));
        let mut loader = Loader::train(data.clone(), Dataset::Cifar10, 5, 9, true).unwrap();
        let mut batches = loader.epoch(4).unwrap();
        let b = batches.next_batch().unwrap().unwrap();
        let order = shuffled(5, 9, 4);
        assert_eq!(b.norm, normalization(Dataset::Cifar10));
        for ((img, crop), &i) in b.bytes.chunks_exact(IMAGE_BYTES).zip(&b.crops).zip(&order) {
            assert_eq!((img, *crop), (data.image(i as usize), random_crop(9, 4, i as usize)));
        }
    }
}
