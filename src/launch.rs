//! How this process was started: alone, or as one rank of a job by a launcher users already
//! have (docs/launch.md):
//! - torchrun (`torchrun --no-python --nproc-per-node N densenet train ...`): `RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`;
//! - SLURM's srun: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (set for a job step, not in a
//!   batch script, whose `SLURM_NTASKS` counts the tasks it may start), `SLURM_LOCALID`, and
//!   `MASTER_ADDR` if given, else the first host of `SLURM_STEP_NODELIST` or
//!   `SLURM_JOB_NODELIST` (hostlist syntax).

use crate::{bail, Error, Result};

/// The launcher that started a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// PyTorch's torchrun (its elastic agent).
    Torchrun,
    /// SLURM's srun.
    Slurm,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "srun",
        })
    }
}

/// This process as one rank of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rank {
    /// Who started it.
    pub launcher: Launcher,
    /// Its rank, below `world`.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Its rank among those on its machine.
    pub local_rank: usize,
    /// Host of rank 0's rendezvous (torchrun's `MASTER_ADDR`, or SLURM's first host).
    pub master_addr: String,
    /// Port of torchrun's store on the master host (`MASTER_PORT`; none under srun unless
    /// given).
    pub master_port: Option<u16>,
    /// The port rank 0 listens on for the job's rendezvous ([`crate::comm::rendezvous`]):
    /// `DENSENET_PORT` if given; else under torchrun the port after `MASTER_PORT` (torchrun's
    /// store holds that one); else `MASTER_PORT`, or [`DEFAULT_PORT`].
    pub port: u16,
}

/// The rendezvous port under srun when neither `DENSENET_PORT` nor `MASTER_PORT` is given
/// (PyTorch's default `MASTER_PORT`).
pub const DEFAULT_PORT: u16 = 29500;

impl Rank {
    /// The rank the launcher's variables describe (read through `var`), or `None` when no
    /// launcher started this process; an error naming the variable when one is missing or not
    /// valid.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rank>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| v.trim().parse().map_err(|_| Error(format!("{name}={v} is not a whole number"))))
                .transpose()
        };
        let needed = |name: &str, launcher: &str| {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| Error(format!("{launcher} set no {name}")))
        };
        let port = |v: String| v.trim().parse::<u16>().map_err(|_| Error(format!("MASTER_PORT={v} is not a port")));
        let (launcher, rank, world, local_rank, master_addr, master_port) = if var("RANK").is_some()
            || var("WORLD_SIZE").is_some()
        {
            let (rank, world) = (number("RANK")?, number("WORLD_SIZE")?);
            let (Some(rank), Some(world)) = (rank, world) else { bail!("torchrun sets RANK and WORLD_SIZE together") };
            let master = needed("MASTER_ADDR", "torchrun")?;
            let port = port(needed("MASTER_PORT", "torchrun")?)?;
            (Launcher::Torchrun, rank, world, number("LOCAL_RANK")?.unwrap_or(0), master, Some(port))
        } else if let (Some(rank), Some(world)) = (number("SLURM_PROCID")?, number("SLURM_STEP_NUM_TASKS")?) {
            let master = match var("MASTER_ADDR").filter(|v| !v.is_empty()) {
                Some(m) => m,
                None => {
                    let list = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST"));
                    first_host(&list.ok_or_else(|| Error("srun set no SLURM_JOB_NODELIST".into()))?)?
                }
            };
            let port = var("MASTER_PORT").map(port).transpose()?;
            (Launcher::Slurm, rank, world, number("SLURM_LOCALID")?.unwrap_or(0), master, port)
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            bail!("rank {rank} of {world}: the launcher's variables do not describe a rank of the job");
        }
        let given = var("DENSENET_PORT").map(|v| {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| Error(format!("DENSENET_PORT={v} is not a port")))
        });
        let port = match (given.transpose()?, launcher, master_port) {
            (Some(p), _, _) => p,
            (None, Launcher::Torchrun, Some(p)) => p
                .checked_add(1)
                .ok_or_else(|| Error("MASTER_PORT=65535 leaves no port after it: set DENSENET_PORT".into()))?,
            (None, _, p) => p.unwrap_or(DEFAULT_PORT),
        };
        Ok(Some(Rank { launcher, rank, world, local_rank, master_addr, master_port, port }))
    }

    /// The rank of this process, from its environment.
    pub fn of_process() -> Result<Option<Rank>> {
        Rank::from_env(|name| std::env::var(name).ok())
    }
}

/// The first host of a SLURM hostlist: `gpu[03-05,9],login1` gives `gpu03`. Brackets hold
/// comma-separated numbers and ranges (leading zeros kept); a name may have several bracket
/// groups (`rack[1-2]-node[07-08]` gives `rack1-node07`).
pub fn first_host(list: &str) -> Result<String> {
    let bad = || Error(format!("'{list}' is not a SLURM hostlist"));
    let mut host = String::new();
    let mut rest = list.trim();
    loop {
        let cut = rest.find(['[', ',']).unwrap_or(rest.len());
        host += &rest[..cut];
        rest = &rest[cut..];
        let Some(inside) = rest.strip_prefix('[') else { break };
        let close = inside.find(']').ok_or_else(bad)?;
        let first = inside[..close].split(',').next().and_then(|r| r.split('-').next()).unwrap_or("");
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        host += first;
        rest = &inside[close + 1..];
    }
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rank(vars: &[(&str, &str)]) -> Result<Option<Rank>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Rank::from_env(|name| map.get(name).cloned())
    }

    #[test]
    fn hostlists_give_their_first_host() {
        for (list, first) in [
            ("node1", "node1"),
            ("node1,node2", "node1"),
            ("gpu[03-05,9],login1", "gpu03"),
            ("gpu[7,3-4]", "gpu7"),
            ("rack[1-2]-node[07-08]", "rack1-node07"),
            ("n[001-128]-ib", "n001-ib"),
            (" a[0] ", "a0"),
        ] {
            assert_eq!(first_host(list).unwrap(), first, "{list}");
        }
        for bad in ["", "node[", "node[]", "node[a-b]", ","] {
            let e = first_host(bad).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.0.contains("is not a SLURM hostlist"), "{e}");
        }
    }

    #[test]
    fn launchers_are_told_by_their_variables() {
        assert_eq!(rank(&[]).unwrap(), None);
        // A batch script has SLURM_PROCID and SLURM_NTASKS but no job step: not a rank.
        assert_eq!(
            rank(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_NODELIST", "a[1-2]")]).unwrap(),
            None
        );
        let torchrun = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let want = Rank {
            launcher: Launcher::Torchrun,
            rank: 3,
            world: 8,
            local_rank: 3,
            master_addr: "10.0.0.1".into(),
            master_port: Some(29500),
            port: 29501,
        };
        assert_eq!(rank(&torchrun).unwrap(), Some(want.clone()));
        // torchrun's variables win over srun's (torchrun started under srun).
        let mut both = torchrun.to_vec();
        both.extend([("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_JOB_NODELIST", "b1")]);
        assert_eq!(rank(&both).unwrap(), Some(want));
        let srun = [
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-06]"),
        ];
        let got = rank(&srun).unwrap().unwrap();
        assert_eq!(
            (got.launcher, got.rank, got.world, got.local_rank, got.master_addr.as_str(), got.master_port),
            (Launcher::Slurm, 5, 16, 1, "gpu03", None)
        );
        let mut given = srun.to_vec();
        given.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "1234")]);
        let got = rank(&given).unwrap().unwrap();
        assert_eq!((got.master_addr.as_str(), got.master_port, got.port), ("head", Some(1234), 1234));
        assert_eq!(rank(&srun).unwrap().unwrap().port, DEFAULT_PORT);
        given.push(("DENSENET_PORT", "4000"));
        assert_eq!(rank(&given).unwrap().unwrap().port, 4000);
        let mut torchrun = torchrun.to_vec();
        torchrun.push(("DENSENET_PORT", "4001"));
        assert_eq!(rank(&torchrun).unwrap().unwrap().port, 4001);
    }

    #[test]
    fn launcher_variables_that_do_not_fit_are_errors() {
        let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        for (vars, want) in [
            (vec![("RANK", "0")], "torchrun sets RANK and WORLD_SIZE together"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=x is not a whole number"),
            (vec![("RANK", "2"), ("WORLD_SIZE", "2")], "rank 2 of 2"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "rank 0 of 0"),
        ] {
            let mut vars = vars;
            vars.extend(base);
            let e = rank(&vars).err().unwrap_or_else(|| panic!("{vars:?} accepted"));
            assert!(e.0.contains(want), "{vars:?}: {e}");
        }
        let e = rank(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.0.contains("torchrun set no MASTER_ADDR"), "{e}");
        let e =
            rank(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert!(e.0.contains("MASTER_PORT=70000 is not a port"), "{e}");
        let e =
            rank(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "65535")]).unwrap_err();
        assert!(e.0.contains("leaves no port after it"), "{e}");
        let e = rank(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("DENSENET_PORT", "0"),
        ])
        .unwrap_err();
        assert!(e.0.contains("DENSENET_PORT=0 is not a port"), "{e}");
        let e = rank(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "2")]).unwrap_err();
        assert!(e.0.contains("srun set no SLURM_JOB_NODELIST"), "{e}");
    }
}
