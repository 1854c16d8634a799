//! `densenet download`: fetch, check and extract a CIFAR archive.

use crate::*;

pub(crate) fn fetch(a: DownloadArgs) -> Result<(), Failure> {
    let get = if a.force { download::refetch } else { download::fetch };
    report_fetched(&get(&a.data_dir, a.dataset, &a.source.source())?, a.dataset)?;
    Ok(())
}

/// One line on stdout: where the dataset is and its image counts.
pub(crate) fn report_fetched(f: &Fetched, dataset: Dataset) -> densenet::Result<()> {
    let counts = format!("{} training and {} test images", f.train, f.test);
    if f.already_there {
        report(format_args!("{} is already in {} ({counts}); nothing downloaded", dataset.title(), f.folder.display()))
    } else {
        report(format_args!("{} is ready in {}: {counts}", dataset.title(), f.folder.display()))
    }
}
