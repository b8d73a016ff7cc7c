//! Statistics for comparing methods: the paired Student t-test with its p-value, and Holm's
//! step-down correction for a family of tests.
//!
//! The Student-t distribution comes from `statrs`; the tests hold reference values from
//! scipy and statsmodels.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Result of a paired t-test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedTTest {
    /// Number of pairs.
    pub n: usize,
    /// Mean of the differences `a − b`.
    pub mean_difference: f64,
    /// The t statistic.
    pub t: f64,
    /// Degrees of freedom (`n − 1`).
    pub degrees_of_freedom: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// Paired two-sided t-test of `a` against `b` (same subjects, same order).
///
/// Returns `None` with fewer than two pairs or different lengths. When every difference is
/// the same the statistic is infinite (p = 0) unless they are all zero (p = 1).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Option<PairedTTest> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let n = a.len();
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let df = (n - 1) as f64;
    let (t, p) = if var == 0.0 {
        if mean == 0.0 {
            (0.0, 1.0)
        } else {
            (f64::INFINITY.copysign(mean), 0.0)
        }
    } else {
        let t = mean / (var / n as f64).sqrt();
        (t, two_sided_p(t, df))
    };
    Some(PairedTTest {
        n,
        mean_difference: mean,
        t,
        degrees_of_freedom: df,
        p_value: p,
    })
}

/// Holm–Bonferroni adjusted p-values, in the order of `p`: with the m p-values sorted
/// ascending, the i-th (from 0) becomes `min(1, max over j ≤ i of (m − j)·p_(j))`. Rejecting
/// where the adjusted value is below α controls the family-wise error rate at α. NaN
/// p-values stay NaN and do not count in m.
pub fn holm_adjust(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len();
    let mut adjusted = vec![f64::NAN; p.len()];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// Student's t distribution (location 0, scale 1) with `df` degrees of freedom; `None` for
/// `df` that is not positive.
fn student_t(df: f64) -> Option<StudentsT> {
    StudentsT::new(0.0, 1.0, df).ok()
}

/// Two-sided p-value of a t statistic, `P(|T| ≥ |t|)`; NaN for `df` that is not positive.
pub fn two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return 0.0;
    }
    student_t(df).map_or(f64::NAN, |d| (2.0 * d.sf(t.abs())).clamp(0.0, 1.0))
}

/// CDF of Student's t distribution with `df` degrees of freedom; NaN for `df` that is not
/// positive.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    student_t(df).map_or(f64::NAN, |d| d.cdf(t))
}

/// The two-sided 95 % confidence interval of the mean of `values` (Student's t with
/// n − 1 degrees of freedom); `None` with fewer than two values.
pub fn mean_ci95(values: &[f64]) -> Option<(f64, f64)> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = student_t_quantile(0.975, (n - 1) as f64) * (var / n as f64).sqrt();
    Some((mean - half, mean + half))
}

/// The `q` quantile of Student's t with `df` degrees of freedom (0 < q < 1); NaN for `df`
/// that is not positive.
pub fn student_t_quantile(q: f64, df: f64) -> f64 {
    student_t(df).map_or(f64::NAN, |d| d.inverse_cdf(q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_cdf_matches_known_values() {
        // Reference values from scipy.stats.t (scipy 1.x).
        let cases = [
            (1.0, 1.0, 0.75),                     // Cauchy: 1/2 + atan(1)/π
            (2.0, 10.0, 0.963_305_982_614_2),     // t.cdf(2, 10)
            (-1.5, 5.0, 0.096_951_840_121_236_6), // t.cdf(-1.5, 5)
            (2.228_138_851_986, 10.0, 0.975),     // t.ppf(0.975, 10)
            (0.0, 3.0, 0.5),
            (12.706_204_736_174_694, 1.0, 0.975),
        ];
        for (t, df, expected) in cases {
            let got = student_t_cdf(t, df);
            assert!(
                (got - expected).abs() < 1e-9,
                "t={t} df={df}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn paired_t_test_matches_a_worked_example() {
        // Differences 1, 2, 3, 4, 5: mean 3, sd √2.5, t = 3 / (√2.5/√5) = 4.2426…, df 4,
        // two-sided p = 0.013 235 6 (scipy.stats.ttest_rel).
        let a = [2.0, 4.0, 6.0, 8.0, 10.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.0];
        let r = paired_t_test(&a, &b).unwrap();
        assert!((r.t - 4.242_640_687).abs() < 1e-8);
        assert!(
            (r.p_value - 0.013_235_599_563_682_69).abs() < 1e-9,
            "{}",
            r.p_value
        );
        assert_eq!(r.degrees_of_freedom, 4.0);
        assert!(paired_t_test(&[1.0], &[2.0]).is_none());
        assert_eq!(
            paired_t_test(&[1.0, 1.0], &[1.0, 1.0]).unwrap().p_value,
            1.0
        );
    }

    /// Reference values from statsmodels 0.15.0 `multipletests(p, method="holm")[1]`.
    #[test]
    fn holm_matches_statsmodels() {
        let cases: [(&[f64], &[f64]); 4] = [
            (&[0.01, 0.04, 0.03, 0.005], &[0.03, 0.06, 0.06, 0.02]),
            (
                &[0.2, 0.01, 0.5, 0.04, 0.03, 0.9],
                &[0.6000000000000001, 0.06, 1.0, 0.16, 0.15, 1.0],
            ),
            (&[0.001], &[0.001]),
            (&[0.04, 0.04, 0.04], &[0.12, 0.12, 0.12]),
        ];
        for (p, expected) in cases {
            let got = holm_adjust(p);
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 1e-12, "{p:?}: {got:?} vs {expected:?}");
            }
        }
        let with_nan = holm_adjust(&[0.01, f64::NAN, 0.02]);
        assert!(with_nan[1].is_nan());
        assert_eq!((with_nan[0], with_nan[2]), (0.02, 0.02));
    }

    #[test]
    fn confidence_intervals_match_scipy() {
        // scipy.stats.t.ppf(0.975, 4) = 2.7764451051977934; t.ppf(0.975, 29) = 2.045229642132703
        assert!((student_t_quantile(0.975, 4.0) - 2.776_445_105_197_793_4).abs() < 1e-9);
        assert!((student_t_quantile(0.975, 29.0) - 2.045_229_642_132_703).abs() < 1e-9);
        // mean 3, sd sqrt(2.5), n 5: 3 ± 2.7764451 · sqrt(2.5 / 5)
        let (lo, hi) = mean_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let half = 2.776_445_105_197_793_4 * (0.5f64).sqrt();
        assert!((lo - (3.0 - half)).abs() < 1e-9 && (hi - (3.0 + half)).abs() < 1e-9);
        assert!(mean_ci95(&[1.0]).is_none());
    }
}
