//! Statistics for comparing methods: the paired Student t-test with its p-value, and Holm's
//! step-down correction for a family of tests.
//!
//! The Student-t CDF is computed from the regularised incomplete beta function
//! `I_x(a, b)` by its continued fraction (Lentz's method), with `ln Γ` by the Lanczos
//! approximation — textbook numerics, written here because no small, well-kept crate does
//! only this.

use serde::{Deserialize, Serialize};

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

/// Two-sided p-value of a t statistic: `P(|T| ≥ |t|) = I_{ν/(ν+t²)}(ν/2, 1/2)`.
pub fn two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return 0.0;
    }
    regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5).clamp(0.0, 1.0)
}

/// CDF of Student's t distribution with `df` degrees of freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * two_sided_p(t, df);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, n = 9; ~15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularised incomplete beta `I_x(a, b)`.
pub fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    // I_x(a, b) = 1 − I_{1−x}(b, a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_continued_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_continued_fraction(1.0 - x, b, a) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-15;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..500 {
        let m = m as f64;
        // Even step.
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + num / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    h
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

/// The `q` quantile of Student's t with `df` degrees of freedom (0 < q < 1), by bisection
/// on [`student_t_cdf`].
pub fn student_t_quantile(q: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
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
