//! A run's recipe: everything that fixes what it computes. The network (and the ImageNet
//! architecture it is built as), the data set, the image size, the batch size, the SGD hyper-parameters, the epochs (and so the LR milestones), augmentation, the
//! seed and the run's name. Every checkpoint stores the whole recipe (JSON, with a schema
//! version), so `densenet train --resume PATH` alone continues a run as it was; a flag that
//! differs from it is refused unless `--change-recipe` is given, and every change is recorded
//! in the recipe itself.
//!
//! How a run executes is not recipe, and may change on resume: the device, the memory mode,
//! the data path, the thread count.

use crate::comm::BnMode;
use crate::config::{Arch, NetConfig};
use crate::data::cifar::{Dataset, SIDE};
use crate::{bail, Error, Result};
use serde::{Deserialize, Serialize};

/// The recipe schema this build writes, and the newest it reads. Schema 2 added `arch` and
/// `image_size` (a schema-1 recipe reads as a CIFAR network on 32x32 images); schema 3 added
/// `bn` (an older recipe reads as `sync`, which a run of one process is).
pub const SCHEMA: u32 = 3;
/// Largest batch accepted (keeps every planned size far from overflow).
pub const MAX_BATCH: usize = 1 << 24;
/// Largest number of epochs (keeps the schedule arithmetic far from overflow).
pub const MAX_EPOCHS: usize = 1_000_000;
/// Largest image side accepted (keeps every planned size far from overflow).
pub const MAX_IMAGE_SIZE: usize = 8192;

/// A run's recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Schema version: [`SCHEMA`] when written by this build.
    pub schema: u32,
    /// The run's name: its directory under the runs directory.
    pub name: String,
    /// The data set trained on.
    pub dataset: Dataset,
    /// The network.
    pub network: NetConfig,
    /// The ImageNet architecture the network is built as (`--arch`; [`Arch::of`] the network),
    /// `null` for a CIFAR network.
    #[serde(default)]
    pub arch: Option<Arch>,
    /// The network's input height and width: the stored images upsampled by an integer factor.
    #[serde(default = "stored_side")]
    pub image_size: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Total epochs; the LR milestones are at 50% and 75% of them.
    pub epochs: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 weight decay on every parameter.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Random crops and flips of the training images.
    pub augment: bool,
    /// How batch norm treats a data-parallel job's shards (`--bn`; the same step in one
    /// process either way).
    #[serde(default)]
    pub bn: BnMode,
    /// The seed of every random stream.
    pub seed: u64,
    /// The changes `--change-recipe` made, oldest first.
    pub changes: Vec<Change>,
}

/// One change `--change-recipe` made to a run's recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// The first epoch trained with the new value.
    pub epoch: usize,
    /// What changed, by its `densenet train` flag (`--epochs`), or in words for a switch
    /// (`augmentation`).
    pub what: String,
    /// The value before.
    pub from: String,
    /// The value after.
    pub to: String,
}

/// A difference between two recipes: what, and its value in each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// By its `densenet train` flag, or in words for a switch.
    pub what: &'static str,
    /// The value in the first recipe.
    pub from: String,
    /// The value in the second.
    pub to: String,
}

/// What a recipe is compared by, each with how it reads a recipe: the `densenet train`
/// flags, and in words what no flag sets alone.
type Aspect = (&'static str, fn(&Recipe) -> String);

/// The image size of a schema-1 recipe: the stored images'.
fn stored_side() -> usize {
    SIDE
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

/// The aspects of the network and its data set, listed first.
const NETWORK: [Aspect; 6] = [
    ("--dataset", |r| r.dataset.to_string()),
    ("--arch", |r| r.arch.map_or("none".to_string(), |a| a.to_string())),
    ("--layers", |r| r.network.depth().to_string()),
    ("--growth", |r| r.network.growth.to_string()),
    ("bottleneck", |r| on_off(r.network.bottleneck)),
    ("--reduce", |r| r.network.reduction.to_string()),
];

/// The other aspects.
const TRAINING: [Aspect; 13] = [
    ("--droprate", |r| r.network.drop_rate.to_string()),
    ("--precision", |r| r.network.precision.to_string()),
    ("--image-size", |r| r.image_size.to_string()),
    ("--name", |r| r.name.clone()),
    ("--batch-size", |r| r.batch_size.to_string()),
    ("--epochs", |r| r.epochs.to_string()),
    ("--lr", |r| r.lr.to_string()),
    ("--momentum", |r| r.momentum.to_string()),
    ("--weight-decay", |r| r.weight_decay.to_string()),
    ("Nesterov", |r| on_off(r.nesterov)),
    ("augmentation", |r| on_off(r.augment)),
    ("--bn", |r| r.bn.to_string()),
    ("--seed", |r| r.seed.to_string()),
];

impl Recipe {
    /// The reference recipe (the defaults of the reference `train.py`) for `network` on
    /// `dataset` at its stored image size: batch 64, 300 epochs, lr 0.1, Nesterov momentum 0.9, weight decay 1e-4,
    /// augmentation on.
    pub fn reference(name: &str, dataset: Dataset, network: NetConfig, seed: u64) -> Recipe {
        Recipe {
            schema: SCHEMA,
            name: name.to_string(),
            dataset,
            arch: Arch::of(&network),
            network,
            image_size: SIDE,
            batch_size: 64,
            epochs: 300,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: true,
            augment: true,
            bn: BnMode::Sync,
            seed,
            changes: Vec::new(),
        }
    }

    /// The recipe as stored: one line of JSON, fields in a fixed order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a recipe serializes")
    }

    /// Parses and checks a stored recipe of any schema this build reads (as [`SCHEMA`]); errors
    /// say what is wrong in one line.
    pub fn from_json(text: &str) -> Result<Recipe> {
        let message = |e: serde_json::Error| Error(crate::error::one_line(&e.to_string()));
        let value: serde_json::Value = serde_json::from_str(text).map_err(message)?;
        match value.get("schema").and_then(serde_json::Value::as_u64) {
            Some(v) if (1..=SCHEMA as u64).contains(&v) => {}
            Some(v) => bail!("recipe schema {v}; this build reads schemas 1 to {SCHEMA}"),
            None => bail!("no schema version"),
        }
        let mut recipe: Recipe = serde_json::from_value(value).map_err(message)?;
        recipe.validate()?;
        // Read into this schema's form, it is written back as this schema.
        recipe.schema = SCHEMA;
        Ok(recipe)
    }

    /// Checks what a recipe read from a file could get wrong: every value within the range
    /// the flags accept, and a name that is one folder.
    pub fn validate(&self) -> Result<()> {
        self.network.validate()?;
        check_classes(&self.network, self.dataset)?;
        if self.arch != Arch::of(&self.network) {
            let named = |a: Option<Arch>| a.map_or("none".to_string(), |a| a.to_string());
            bail!("'arch' is {}; the network is built as {}", named(self.arch), named(Arch::of(&self.network)));
        }
        check_image_size(&self.network, self.image_size)?;
        check_name(&self.name).map_err(|e| Error(format!("name {:?} {e}", self.name)))?;
        let finite = |x: f64| x.is_finite() && x >= 0.0;
        let checks = [
            ((1..=MAX_BATCH).contains(&self.batch_size), "batch_size"),
            ((1..=MAX_EPOCHS).contains(&self.epochs), "epochs"),
            (finite(self.lr), "lr"),
            (finite(self.momentum.into()) && self.momentum < 1.0, "momentum"),
            (finite(self.weight_decay.into()), "weight_decay"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => bail!("'{what}' is out of range"),
            None => Ok(()),
        }
    }

    /// What differs between this recipe and `other`, by flag: the network's aspects first.
    pub fn differences(&self, other: &Recipe) -> Vec<Difference> {
        let mut out: Vec<Difference> = NETWORK
            .iter()
            .chain(&TRAINING)
            .map(|(what, get)| Difference { what, from: get(self), to: get(other) })
            .filter(|d| d.from != d.to)
            .collect();
        // What no flag names (stem channels, layers per block): the network as a whole.
        if !self.network.same_parameters(&other.network) && !out.iter().any(|d| NETWORK.iter().any(|n| n.0 == d.what)) {
            let (from, to) = (format!("{:?}", self.network), format!("{:?}", other.network));
            out.insert(0, Difference { what: "network", from, to });
        }
        out
    }

    /// Whether `other` has the same tensors (network and classes), so that a checkpoint of
    /// one can continue as the other.
    pub fn same_tensors(&self, other: &Recipe) -> bool {
        self.network.same_parameters(&other.network)
    }
}

/// Checks a run name: one plain folder name under the runs directory, printable.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) || name.contains(char::is_control) {
        bail!("must be a plain folder name (no '/', '\\' or control characters): the run goes to <runs-dir>/<name>/");
    }
    Ok(())
}

/// Checks that `network` takes `size` x `size` images made from the stored ones: a multiple of
/// their side (each image is upsampled by an integer factor) that the network accepts.
pub fn check_image_size(network: &NetConfig, size: usize) -> Result<()> {
    if !(1..=MAX_IMAGE_SIZE).contains(&size) || !size.is_multiple_of(SIDE) {
        bail!(
            "image size {size} must be a multiple of {SIDE} up to {MAX_IMAGE_SIZE}: the {SIDE}x{SIDE} images are \
             upsampled by a whole factor"
        );
    }
    network.geometry(size, size).map(|_| ())
}

/// Checks that `network` predicts the classes of `dataset`.
pub fn check_classes(network: &NetConfig, dataset: Dataset) -> Result<()> {
    if network.num_classes != dataset.classes() {
        bail!(
            "{} predicts {} classes; {} has {}",
            network.name(),
            network.num_classes,
            dataset.title(),
            dataset.classes()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe::reference("r", Dataset::Cifar10, NetConfig::cifar(10, 4, true, 0.5, 0.2, 10).unwrap(), 3)
    }

    #[test]
    fn round_trips_in_a_fixed_order() {
        let mut r = recipe();
        r.changes.push(Change { epoch: 2, what: "--epochs".into(), from: "300".into(), to: "400".into() });
        let text = r.to_json();
        assert!(text.starts_with(r#"{"schema":3,"name":"r","dataset":"cifar10","network":{"stem":"cifar","#), "{text}");
        assert!(text.contains(r#""augment":true,"bn":"sync","seed":3,"#), "{text}");
        assert!(text.contains(r#""drop_rate":0.2,"#), "the f32 as written: {text}");
        assert_eq!(Recipe::from_json(&text).unwrap(), r);
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        let text = recipe().to_json();
        let bad = |from: &str, to: &str| {
            assert!(text.contains(from), "{from}");
            Recipe::from_json(&text.replace(from, to)).unwrap_err().0
        };
        assert!(bad(r#""schema":3"#, r#""schema":4"#).contains("recipe schema 4; this build reads schemas 1 to 3"));
        assert!(bad(r#""schema":3,"#, "").contains("no schema version"));
        assert!(bad(r#""bn":"sync""#, r#""bn":"both""#).contains("unknown batch-norm mode 'both'"));
        assert!(bad(r#""image_size":32"#, r#""image_size":48"#).contains("image size 48 must be a multiple of 32"));
        assert!(bad(r#""image_size":32"#, r#""image_size":0"#).contains("image size 0"));
        assert!(bad(r#""arch":null"#, r#""arch":"densenet121""#).contains("'arch' is densenet121; the network is"));
        assert!(bad(r#""arch":null"#, r#""arch":"resnet""#).contains("unknown architecture 'resnet'"));
        assert!(bad(r#""name":"r""#, r#""name":"../x""#).contains("plain folder name"));
        assert!(bad(r#""epochs":300"#, r#""epochs":0"#).contains("'epochs' is out of range"));
        assert!(bad(r#""momentum":0.9"#, r#""momentum":1.0"#).contains("'momentum'"));
        assert!(bad(r#""growth":4"#, r#""growth":0"#).contains("growth rate"));
        assert!(bad(r#""cifar10""#, r#""cifar100""#).contains("predicts 10 classes; CIFAR-100 has 100"));
        assert!(bad(r#""name":"r""#, r#""name":"a\nb""#).contains(r#"name "a\nb" must be"#));
        assert!(bad(r#""seed":3"#, r#""seed":3,"extra":1"#).contains("unknown field `extra`"));
        assert!(bad(r#""lr":0.1"#, r#""lr":"fast""#).contains("invalid type"));
        assert!(Recipe::from_json("[1").is_err());
    }

    /// Structure-aware fuzzing of the recipe reader: one to three of the recipe's numbers and
    /// strings (keys included) replaced by values of other types and ranges, a fixed seeded
    /// budget: no panic, every rejection one line, and what it accepts valid.
    #[test]
    fn fuzzed_recipes_never_panic() {
        const CASES: u64 = 20_000;
        let mut seed = recipe();
        seed.changes.push(Change { epoch: 2, what: "--epochs".into(), from: "300".into(), to: "400".into() });
        let text = seed.to_json();
        let spans = crate::testing::json_spans(&text);
        let values = crate::testing::json_values(&["..", "a/b", "cifar100", "imagenet", "schema", "name"]);
        let mut accepted = 0;
        for case in 0..CASES {
            let r = |k: u64| crate::rng::derive(crate::rng::derive(0x7ec1, case), k);
            let mut picked: Vec<usize> = (0..1 + r(0) % 3).map(|k| (r(1 + k) % spans.len() as u64) as usize).collect();
            picked.sort_unstable();
            picked.dedup();
            let mut t = text.clone();
            // From the end, so that earlier spans keep their offsets.
            for (k, &i) in picked.iter().enumerate().rev() {
                let (a, b) = spans[i];
                t.replace_range(a..b, values[(r(10 + k as u64) % values.len() as u64) as usize]);
            }
            match std::panic::catch_unwind(|| Recipe::from_json(&t)) {
                Err(_) => panic!("case {case} panicked: {t}"),
                Ok(Ok(r)) => {
                    accepted += 1;
                    assert_eq!(r.validate(), Ok(()), "{t}");
                }
                Ok(Err(e)) => assert!(!e.0.is_empty() && !e.0.contains('\n'), "case {case}: {e}"),
            }
        }
        crate::testing::Tally { parser: "recipe (checkpoint metadata)", cases: CASES, counts: vec![accepted] }.check();
    }

    /// A schema-1 recipe (before `arch` and `image_size`) is a CIFAR network on 32x32 images;
    /// a schema-2 one (before `bn`) synchronizes BN.
    #[test]
    fn older_schemas_read_with_their_defaults() {
        let two = recipe().to_json().replace(r#""schema":3"#, r#""schema":2"#).replace(r#""bn":"sync","#, "");
        assert!(!two.contains("bn"), "{two}");
        assert_eq!(Recipe::from_json(&two).unwrap(), recipe());
        let one = two.replace(r#""schema":2"#, r#""schema":1"#).replace(r#""arch":null,"image_size":32,"#, "");
        assert!(!one.contains("image_size"), "{one}");
        assert_eq!(Recipe::from_json(&one).unwrap(), recipe());
    }

    #[test]
    fn architectures_and_image_sizes_are_recipe() {
        let net = crate::config::Arch::Densenet121.config(32, 0.0, 10).unwrap();
        let r = Recipe { image_size: 224, ..Recipe::reference("r", Dataset::Cifar10, net, 3) };
        assert_eq!(r.arch, Some(crate::config::Arch::Densenet121));
        assert_eq!(Recipe::from_json(&r.to_json()).unwrap(), r);
        assert!(r.to_json().contains(r#""arch":"densenet121","image_size":224,"#));
        let d = recipe().differences(&r);
        assert_eq!(d[0], Difference { what: "--arch", from: "none".into(), to: "densenet121".into() });
        assert!(d.iter().any(|d| d.what == "--image-size" && d.to == "224"));
        assert!(!recipe().same_tensors(&r));
        assert_eq!(Recipe { image_size: 96, ..r.clone() }.validate(), Ok(()));
        assert!(Recipe { image_size: 200, ..r }.validate().is_err());
    }

    #[test]
    fn differences_are_named_by_flag() {
        let a = recipe();
        assert!(a.differences(&a).is_empty());
        let b = Recipe { epochs: 400, augment: false, ..a.clone() };
        let d = a.differences(&b);
        assert_eq!(
            d,
            [
                Difference { what: "--epochs", from: "300".into(), to: "400".into() },
                Difference { what: "augmentation", from: "on".into(), to: "off".into() }
            ]
        );
        assert!(a.same_tensors(&b));
        let dropout = Recipe { network: NetConfig { drop_rate: 0.0, ..a.network.clone() }, ..a.clone() };
        assert_eq!(a.differences(&dropout)[0].what, "--droprate");
        assert!(a.same_tensors(&dropout));
        let half = Recipe {
            network: NetConfig { precision: crate::config::Precision::Bf16, ..a.network.clone() },
            ..a.clone()
        };
        assert_eq!(a.differences(&half)[0], Difference { what: "--precision", from: "f32".into(), to: "bf16".into() });
        assert!(a.same_tensors(&half));
        let wider = Recipe { network: NetConfig::cifar(10, 8, true, 0.5, 0.2, 10).unwrap(), ..a.clone() };
        assert_eq!(a.differences(&wider)[0], Difference { what: "--growth", from: "4".into(), to: "8".into() });
        assert!(!a.same_tensors(&wider));
        // Only the stem differs: no flag names it, the network as a whole does.
        let stem = Recipe { network: NetConfig { stem_channels: 9, ..a.network.clone() }, ..a.clone() };
        assert_eq!(a.differences(&stem)[0].what, "network");
    }
}
