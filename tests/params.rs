//! Architecture checks: parameter counts equal the reference implementations' (docs/reference.md),
//! names follow the reference state dict, initialization follows the reference.

use densenet::backend::CpuBackend;
use densenet::config::{Arch, NetConfig};
use densenet::model::net::Net;
use densenet::model::params::Init;
use densenet::model::plan::Mode;
use densenet::model::Model;

fn count(cfg: &NetConfig) -> usize {
    Net::new(cfg).layout.len
}

#[test]
fn cifar_parameter_counts_match_reference() {
    // (depth, growth, bottleneck, reduction, CIFAR-10, CIFAR-100)
    let rows = [
        (100, 12, true, 0.5, 769_162, 800_032),
        (40, 12, false, 1.0, 1_059_298, 1_100_428),
        (250, 24, true, 0.5, 15_324_406, 15_480_556),
        (190, 40, true, 0.5, 25_624_430, 25_821_620),
    ];
    for (depth, k, b, r, c10, c100) in rows {
        for (classes, want) in [(10, c10), (100, c100)] {
            let cfg = NetConfig::cifar(depth, k, b, r, 0.0, classes).unwrap();
            assert_eq!(count(&cfg), want, "{} with {classes} classes", cfg.name());
        }
    }
}

/// Every preset at 1000 classes and at custom class counts, and the paper's largest model
/// (DenseNet-264 with k = 48), against torchvision's `DenseNet` (counted with torchvision 0.29).
#[test]
fn imagenet_parameter_counts_match_reference() {
    // (architecture, growth, 1000 classes, 10 classes, 100 classes)
    let rows = [
        (Arch::Densenet121, 32, 7_978_856, 6_964_106, 7_056_356),
        (Arch::Densenet169, 32, 14_149_480, 12_501_130, 12_650_980),
        (Arch::Densenet201, 32, 20_013_928, 18_112_138, 18_285_028),
        (Arch::Densenet161, 48, 28_681_000, 26_494_090, 26_692_900),
        (Arch::Densenet264, 32, 33_337_704, 30_675_594, 30_917_604),
        (Arch::Densenet264, 48, 72_686_632, 68_693_962, 69_056_932),
    ];
    for (arch, k, c1000, c10, c100) in rows {
        for (classes, want) in [(1000, c1000), (10, c10), (100, c100)] {
            let cfg = arch.config(k, 0.0, classes).unwrap();
            assert_eq!(count(&cfg), want, "{} with {classes} classes", cfg.name());
        }
    }
    assert_eq!(NetConfig::imagenet("densenet161").unwrap(), Arch::Densenet161.config(48, 0.0, 1000).unwrap());
}

#[test]
fn names_follow_the_reference_state_dict() {
    let net = Net::new(&NetConfig::cifar(100, 12, true, 0.5, 0.0, 10).unwrap());
    let names: Vec<&str> = net.layout.params.iter().map(|t| t.name.as_str()).collect();
    for want in [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.conv1.weight",
        "block1.layer.15.bn2.bias",
        "block3.layer.15.conv2.weight",
        "trans1.bn1.weight",
        "trans2.conv1.weight",
        "bn1.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(names.contains(&want), "missing {want}");
    }
    let stats: Vec<&str> = net.layout.running.iter().map(|t| t.name.as_str()).collect();
    assert!(stats.contains(&"block2.layer.3.bn1.running_mean"));
    assert!(stats.contains(&"bn1.running_var"));
    let conv = net.layout.params.iter().find(|t| t.name == "block1.layer.0.conv1.weight").unwrap();
    assert_eq!(conv.shape, vec![48, 24, 1, 1]);
    // Offsets tile the buffer exactly.
    let mut end = 0;
    for t in &net.layout.params {
        assert_eq!(t.off, end, "{} not contiguous", t.name);
        end += t.len();
    }
    assert_eq!(end, net.layout.len);
}

#[test]
fn initialization_follows_reference_and_seed() {
    let cfg = NetConfig::cifar(40, 12, false, 1.0, 0.0, 10).unwrap();
    let initial = |seed| Model::new(cfg.clone(), 1, 32, 32, Mode::Minimal, seed, CpuBackend::new()).unwrap().params();
    let a = initial(3);
    assert_eq!(a, initial(3), "same seed, same weights");
    assert_ne!(a, initial(4), "seed matters");
    let net = Net::new(&cfg);
    let lay = &net.layout;
    for t in &lay.params {
        let v = &a[t.off..t.off + t.len()];
        match t.init {
            Init::Normal(std) => {
                let [cout, _, k, _] = t.shape[..] else { panic!("{} not a conv", t.name) };
                assert!((std - (2.0 / (k * k * cout) as f64).sqrt()).abs() < 1e-12);
                let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
                assert!((var.sqrt() / std - 1.0).abs() < 0.1, "{}: std {} vs {std}", t.name, var.sqrt());
            }
            Init::Uniform(b) => {
                assert_eq!(t.name, "fc.weight");
                assert!(v.iter().all(|&x| (x as f64).abs() <= b));
            }
            Init::Const(c) => {
                let want = if t.name.ends_with(".weight") { 1.0 } else { 0.0 };
                assert_eq!(c, want, "{}", t.name);
                assert!(v.iter().all(|&x| x == c));
            }
        }
    }
}
