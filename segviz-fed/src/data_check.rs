//! The data check every run makes before it trains: every case of every site read and
//! preprocessed (file presence and readability, image/label shape and affine, label values
//! against the dataset's map, finite voxels), and every file's geometry warnings collected.
//! The experiment and the Flower node both call it, so a site is checked the same way
//! wherever it trains.

use segviz_data::SiteData;

use crate::error::Result;
use crate::experiment::parallel_map;

/// What the data check of [`check_cases`] reports while it reads every case.
#[derive(Debug, Clone)]
pub struct DataCheckProgress {
    /// Cases checked so far.
    pub checked: usize,
    /// Cases in all (training, validation and test).
    pub total: usize,
}

/// Checks every case (training, validation and test splits) of `sites`, a few at a time,
/// reporting progress after each group. Returns one line per problem (naming the site, the
/// case and the file) and one line per geometry warning (naming the file). The preprocessed
/// volumes stay in each site's cache, so training reads them from there.
///
/// # Errors
/// Only if a checking thread panics; data problems are returned, not raised.
pub fn check_cases(
    sites: &[&SiteData],
    mut on_progress: impl FnMut(DataCheckProgress),
) -> Result<(Vec<String>, Vec<String>)> {
    let cases: Vec<(&SiteData, &String)> = sites
        .iter()
        .flat_map(|s| {
            s.split
                .train
                .iter()
                .chain(&s.split.validation)
                .map(move |c| (*s, c))
        })
        .collect();
    let total = cases.len();
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    // A few at a time: each holds a whole CT volume in memory.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut checked = 0;
    for group in cases.chunks(threads) {
        let outcomes = parallel_map(group, threads, |(site, case)| {
            let problem = site
                .volume(case)
                .err()
                .map(|e| format!("site {} case {case}: {e}", site.name()));
            Ok((problem, geometry_warnings(site, case)))
        })?;
        for (problem, mut found) in outcomes {
            problems.extend(problem);
            warnings.append(&mut found);
        }
        checked += group.len();
        on_progress(DataCheckProgress { checked, total });
    }
    Ok((problems, warnings))
}

/// The geometry warnings of a case's image and label headers, one line per warning.
fn geometry_warnings(site: &SiteData, case: &str) -> Vec<String> {
    let Some(index) = site.dataset.position(case) else {
        return Vec::new();
    };
    let files = &site.dataset.cases[index];
    [&files.image, &files.label]
        .into_iter()
        .filter_map(|path| segviz_data::read_header(path).ok())
        .flat_map(|info| {
            let path = info.path.display().to_string();
            info.warnings
                .into_iter()
                .map(move |w| format!("{path}: {w}"))
        })
        .collect()
}
