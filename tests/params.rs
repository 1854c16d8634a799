//! Architecture checks: parameter counts equal the reference implementations' (docs/reference.md),
//! names follow the reference state dict, initialization follows the reference.

use densenet::backend::CpuBackend;
use densenet::config::NetConfig;
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

#[test]
fn imagenet_parameter_counts_match_reference() {
    let rows = [
        ("densenet121", 7_978_856),
        ("densenet169", 14_149_480),
        ("densenet201", 20_013_928),
        ("densenet161", 28_681_000),
        ("densenet264", 33_337_704),
    ];
    for (name, want) in rows {
        assert_eq!(count(&NetConfig::imagenet(name).unwrap()), want, "{name}");
    }
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
