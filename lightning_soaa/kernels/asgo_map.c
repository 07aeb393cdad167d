/* ASGO's spectral map on the CPU: z(lam / s) / sqrt(s) of a batch of eigenvalues in one call.
 *
 * The same IEEE double operations, in the same order, as the tensor evaluation of
 * lightning_soaa.functional.linalg (coupled_scalar_map and _mapped_spectrum): built with -ffp-contract=off and
 * without -ffast-math, so no two operations are fused or reordered and each rounds once, whatever the
 * vector width the compiler picks; the result is that evaluation's, bit for bit. The square root of each scale
 * is the caller's (torch's own, which is not always correctly rounded on a CPU).
 */
#include <math.h>
#include <stdint.h>

int asgo_map_abi(void) { return 2; }

/* The exact first half of the map's scale (lightning_soaa.functional.linalg._spectral_scales), for each of `n`
 * contiguous k x k float64 matrices: its largest magnitude (NaN when it has a NaN; 0 for a zero matrix), the
 * power of two 2^e of that magnitude's exponent (frexp's e; 1 for 0 and non-finite magnitudes, inf past 2^1023)
 * and the matrix divided by it, into u. The largest magnitude and a division by a power of two are exact (the
 * division correctly rounded where the quotient is subnormal), so these are numpy's and torch's bits; the
 * reductions that round (the Frobenius norm, the trace) stay torch's. */
void asgo_scaled_down(const double *v, double *u, int64_t n, int64_t k, double *tops, double *scales)
{
    const int64_t kk = k * k;
    for (int64_t m = 0; m < n; ++m) {
        const double *a = v + m * kk;
        double *b = u + m * kk;
        double top = 0.0;
        int nan = 0;
        for (int64_t i = 0; i < kk; ++i) {
            const double x = a[i], mag = x < 0.0 ? -x : x;
            if (x != x)
                nan = 1;
            else if (mag > top)
                top = mag;
        }
        if (nan)
            top = __builtin_nan("");
        int e = 0;
        if (top - top == 0.0) /* finite: its exponent; 0 gives 0 */
            frexp(top, &e);
        const double s = e <= 1023 ? ldexp(1.0, e) : INFINITY;
        for (int64_t i = 0; i < kk; ++i)
            b[i] = a[i] / s;
        tops[m] = top;
        scales[m] = s;
    }
}

/* For each of `rows` rows of `k` eigenvalues: x = max(lam / scale, 0) (a NaN stays NaN), the coupled
 * recursion's map of x (coeffs: `num_iters` triples (a, b, c), one per iteration; `polish` Newton-Schulz steps
 * z (1.5 - 0.5 z^2 x) from x + floor), divided by root; written to out (rows x k) and each row's largest
 * magnitude to row_max (NaN when the row has a NaN). */
void asgo_spectral_map(const double *lam, double *out, int64_t rows, int64_t k, const double *scales,
                       const double *roots, const double *coeffs, int64_t num_iters, double floor,
                       int64_t polish, double *row_max)
{
    for (int64_t r = 0; r < rows; ++r) {
        const double s = scales[r], root = roots[r];
        double top = 0.0;
        int nan = 0;
        for (int64_t j = 0; j < k; ++j) {
            double x = lam[r * k + j] / s;
            x = x < 0.0 ? 0.0 : x;
            double y = x + floor, z = 1.0;
            if (num_iters > 0) {
                double q = y * coeffs[2]; /* t = z y = y */
                q = q + coeffs[1];
                q = q * y;
                q = q + coeffs[0];
                y = y * q;
                z = q;
            }
            for (int64_t i = 1; i < num_iters; ++i) {
                const double t = z * y;
                double q = t * coeffs[3 * i + 2];
                q = q + coeffs[3 * i + 1];
                q = q * t;
                q = q + coeffs[3 * i];
                y = y * q;
                z = z * q;
            }
            for (int64_t i = 0; i < polish; ++i) {
                double u = z * 0.5;
                u = u * z;
                u = u * x;
                z = z * (1.5 - u);
            }
            z = z / root;
            out[r * k + j] = z;
            const double mag = z < 0.0 ? -z : z;
            if (z != z)
                nan = 1;
            else if (mag > top)
                top = mag;
        }
        row_max[r] = nan ? __builtin_nan("") : top;
    }
}
