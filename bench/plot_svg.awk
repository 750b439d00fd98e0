# Hand-written SVG line plot of two series against a log-scale x axis (bench/run.sh draws ingest's
# throughput against the number of devices with it). Plain awk, no plotting package.
#
#   awk -F'\t' -v title=T -v subtitle=S -v xlabel=X -v ylabel=Y -v xcol=1 -v ycol=4 -v rcol=7 \
#       -v ylab=ours -v rlab=reference -f bench/plot_svg.awk DATA.tsv >OUT.svg
#
# DATA.tsv has a header line; xcol is the x value (> 0), ycol the first series, rcol the second. Rows
# with an empty or non-numeric value leave that point out of its series.

function esc(s) {
    gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); gsub(/>/, "\\&gt;", s); gsub(/"/, "\\&quot;", s)
    return s
}
function isnum(s) { return s ~ /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$/ }
function log10(v) { return log(v) / log(10) }
function px(v) { return L + (log10(v) - x0) / (x1 - x0) * W }
function py(v) { return T + H - v / ymax * H }
function num(v,    s, r) { # thousands separators, no decimals
    s = sprintf("%.0f", v); r = ""
    while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
    return s r
}
function ytick(v) {
    if (v >= 1e6) return sprintf("%g M", v / 1e6)
    if (v >= 1e3) return sprintf("%g k", v / 1e3)
    return sprintf("%g", v)
}
function series(col, n, color, dash, label,    i, pts, k) {
    pts = ""; k = 0
    for (i = 1; i <= n; i++)
        if (isnum(val[i, col]) && isnum(val[i, xcol]) && val[i, xcol] > 0) {
            pts = pts sprintf("%.1f,%.1f ", px(val[i, xcol]), py(val[i, col])); k++
        }
    if (k > 1)
        printf "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2.5\"%s points=\"%s\"/>\n", color, \
            dash ? " stroke-dasharray=\"7 5\"" : "", pts
    for (i = 1; i <= n; i++)
        if (isnum(val[i, col]) && isnum(val[i, xcol]) && val[i, xcol] > 0)
            printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"><title>%s, %s devices: %s points/s</title></circle>\n", \
                px(val[i, xcol]), py(val[i, col]), color, esc(label), num(val[i, xcol]), num(val[i, col])
}

NR == 1 { next }
{
    n++
    for (c = 1; c <= NF; c++) val[n, c] = $c
}

END {
    WIDTH = 760; HEIGHT = 480; L = 90; R = 30; T = 92; B = 62
    W = WIDTH - L - R; H = HEIGHT - T - B
    # x: the data's decades with a margin, so that no point sits on the frame; y: 0 to a round
    # number above the highest point.
    xmin = 0; xmax = 0; ymax = 0
    for (i = 1; i <= n; i++) {
        x = val[i, xcol]
        if (!isnum(x) || x <= 0) continue
        if (xmin == 0 || x < xmin) xmin = x
        if (x > xmax) xmax = x
        if (isnum(val[i, ycol]) && val[i, ycol] > ymax) ymax = val[i, ycol]
        if (isnum(val[i, rcol]) && val[i, rcol] > ymax) ymax = val[i, rcol]
    }
    if (xmin == 0) { xmin = 1; xmax = 10 }
    x0 = log10(xmin) - 0.15; x1 = log10(xmax) + 0.15
    if (x1 - x0 < 1) { x0 -= 0.5; x1 += 0.5 }
    if (ymax <= 0) ymax = 1
    mag = 10 ^ int(log10(ymax / 5)); if (mag > ymax / 5) mag /= 10
    step = mag
    if (ymax / step > 6) step = 2 * mag
    if (ymax / step > 6) step = 2.5 * mag
    if (ymax / step > 6) step = 5 * mag
    if (ymax / step > 6) step = 10 * mag
    ymax = (int(ymax * 1.05 / step) + 1) * step

    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n", \
        WIDTH, HEIGHT, WIDTH, HEIGHT
    printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
    printf "<text x=\"%d\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">%s</text>\n", WIDTH / 2, esc(title)
    printf "<text x=\"%d\" y=\"42\" text-anchor=\"middle\" fill=\"#555\">%s</text>\n", WIDTH / 2, esc(subtitle)
    # Grid and ticks.
    for (v = 0; v <= ymax + step / 2; v += step) {
        printf "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n", L, L + W, py(v), py(v)
        printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%s</text>\n", L - 8, py(v), ytick(v)
    }
    for (d = int(x0) - 1; d <= x1; d++)
        for (m = 1; m <= 9; m++) {
            lx = d + log10(m)
            if (lx < x0 || lx > x1) continue
            x = L + (lx - x0) / (x1 - x0) * W
            printf "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"%s\"/>\n", x, x, T, T + H, \
                m == 1 ? "#d0d0d0" : "#f2f2f2"
            printf "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#888\"/>\n", x, x, T + H, \
                T + H + (m == 1 ? 6 : 3)
            if (m == 1)
                printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", x, T + H + 18, num(10 ^ d)
        }
    printf "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#888\"/>\n", L, T, W, H
    printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", L + W / 2, HEIGHT - 14, esc(xlabel)
    printf "<text transform=\"translate(22 %d) rotate(-90)\" text-anchor=\"middle\">%s</text>\n", T + H / 2, esc(ylabel)
    # Series: the reference dashed, ours solid on top; each ingest point labelled with its ratio.
    series(rcol, n, "#d62728", 1, rlab)
    series(ycol, n, "#1f77b4", 0, ylab)
    for (i = 1; i <= n; i++)
        if (isnum(val[i, ycol]) && isnum(val[i, rcol]) && val[i, rcol] > 0 && isnum(val[i, xcol]) && val[i, xcol] > 0)
            printf "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"11\" fill=\"#1f77b4\">%.2f</text>\n", \
                px(val[i, xcol]), py(val[i, ycol]) - 10, val[i, ycol] / val[i, rcol]
    # Legend, between the subtitle and the plot.
    lx = L + 10; ly = 66
    printf "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"#1f77b4\" stroke-width=\"2.5\"/>\n", lx, lx + 28, ly, ly
    printf "<circle cx=\"%d\" cy=\"%d\" r=\"4\" fill=\"#1f77b4\"/>\n", lx + 14, ly
    printf "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\">%s (numbers: ours / reference)</text>\n", lx + 36, ly, esc(ylab)
    lx2 = L + W / 2 + 30
    printf "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"#d62728\" stroke-width=\"2.5\" stroke-dasharray=\"7 5\"/>\n", \
        lx2, lx2 + 28, ly, ly
    printf "<circle cx=\"%d\" cy=\"%d\" r=\"4\" fill=\"#d62728\"/>\n", lx2 + 14, ly
    printf "<text x=\"%d\" y=\"%d\" dominant-baseline=\"middle\">%s</text>\n", lx2 + 36, ly, esc(rlab)
    printf "</svg>\n"
}
