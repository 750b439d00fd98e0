# The summary table of a bench run (sourced by bench/run.sh). Sections call `row` as they print their
# figures; `report_render` writes $BENCH_RESULTS/latest.md from the rows at exit, also when a section
# failed, so that what was measured is kept and what was not is marked.
#
#   report_init DIR            rows go to DIR (the run's scratch directory); records start, load
#   section NAME               the previous section ends well, NAME begins (names: BENCH_SECTIONS)
#   section_failed WHY         the current section goes wrong but the run carries on
#   die WHY                    the current section goes wrong and the run stops
#   warn MSG                   "bench: MSG" on stderr, and listed under the table
#   note MSG                   listed under the table only (the console has shown it already)
#   row FIGURE FMT OURS REFERENCE REF_VALUE BETTER [RATIO]
#                              one figure: FMT (printf) formats OURS and REF_VALUE; REFERENCE says what
#                              the reference is; REF_VALUE "-" when there is none (the ratio is then
#                              left empty), an empty value shows as "n/a" (not measured); RATIO is
#                              OURS/REF_VALUE unless given; BETTER: higher, lower or "" (information)
#   report_render RC           writes latest.md (RC: the run's exit status)
#
# Every value in the table is one the console showed in the same run: rows take the very numbers the
# printf next to them prints, or parse the lines a driver printed.

BENCH_SECTIONS=("gRPC layer" "memory" "registry" "device-mgmt" "ingest" "ingest vs devices" "processing" "ota"
    "gateway")

report_init() {
    rep_dir=$1
    : >"$rep_dir/rows.tsv"
    : >"$rep_dir/sections.tsv"
    : >"$rep_dir/warnings.tsv"
    rep_section=
    rep_last=
    rep_start=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
    rep_load_start=$(cut -d' ' -f1-3 /proc/loadavg)
}

# Sections end "ok" unless section_failed said otherwise; the one running at exit is "failed".
section() {
    [ -n "$rep_section" ] && printf '%s\tok\t\n' "$rep_section" >>"$rep_dir/sections.tsv"
    rep_last=${rep_section:-$rep_last}
    rep_section=$1
}

section_failed() {
    printf '%s\tfailed\t%s\n' "$rep_section" "$1" >>"$rep_dir/sections.tsv"
    rep_last=$rep_section
    rep_section=
}

warn() {
    echo "bench: $*" >&2
    note "$*"
}

# die WHY: the current section fails and the run stops (the table is still written, at exit).
die() {
    section_failed "$1"
    exit 1
}

note() { printf '%s\t%s\n' "${rep_section:-${rep_last:--}}" "$*" >>"$rep_dir/warnings.tsv"; }

rep_isnum() { [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }

rep_cell() { # fmt value
    if [ -z "$2" ]; then
        printf 'n/a'
    elif [ "$2" = - ]; then
        printf -- '-'
    elif rep_isnum "$2"; then
        # shellcheck disable=SC2059 # the format is the caller's, for a number
        printf -- "$1" "$2"
    else
        printf '%s' "$2"
    fi
}

row() {
    local fig=$1 fmt=$2 ours=$3 ref=$4 refv=$5 better=$6 ratio=${7-}
    if [ -z "$ratio" ] && rep_isnum "$ours" && rep_isnum "$refv"; then
        # Two decimals, like the console; two significant digits below 0.01 rather than "0.00".
        ratio=$(awk -v x="$ours" -v y="$refv" 'BEGIN{if (y != 0) {r = x / y; printf (r < 0.01 && r > -0.01) ? "%.2g" : "%.2f", r}}')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep_section" "$fig" "$(rep_cell "$fmt" "$ours")" "$ref" \
        "$(rep_cell "$fmt" "$refv")" "${ratio:--}" "${better:--}" >>"$rep_dir/rows.tsv"
}

# knobs: "NAME=value ..." as the run used them (set by run.sh before rendering).
report_render() {
    local rc=$1 out=$BENCH_RESULTS/latest.md
    [ -n "$rep_section" ] && printf '%s\tfailed\texit status %s\n' "$rep_section" "$rc" >>"$rep_dir/sections.tsv"
    rep_section=
    mkdir -p "$BENCH_RESULTS"
    # The sweep's data and plot belong to this run or to none: a stale pair would pass for this one's.
    local f swept
    swept=$(wc -l 2>/dev/null <"$rep_dir/ingest-devices.tsv" || echo 0)
    for f in ingest-devices.tsv ingest-devices.svg; do
        if [ "$swept" -gt 1 ] && [ -s "$rep_dir/$f" ]; then
            mv "$rep_dir/$f" "$BENCH_RESULTS/$f"
        else
            rm -f "$BENCH_RESULTS/$f"
        fi
    done
    local mem cpu commit dirty load_end secs status failed notrun s
    mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
    commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    # Results files are outputs of this very script: their changes do not make the code dirty.
    dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no -- . ':!bench/results' 2>/dev/null | head -n 1)
    load_end=$(cut -d' ' -f1-3 /proc/loadavg)
    secs=$SECONDS
    failed=$(awk -F'\t' '$2 == "failed" {printf "%s%s (%s)", sep, $1, $3; sep = ", "}' "$rep_dir/sections.tsv")
    notrun=
    for s in "${BENCH_SECTIONS[@]}"; do
        awk -F'\t' -v s="$s" '$1 == s {f = 1} END {exit !f}' "$rep_dir/sections.tsv" || notrun="${notrun:+$notrun, }$s"
    done
    if [ -z "$failed" ] && [ -z "$notrun" ] && [ "$rc" = 0 ]; then
        status="complete"
    else
        status="**incomplete**: failed: ${failed:-none}; not run: ${notrun:-none}"
    fi
    {
        echo "# iotsuite benchmark results"
        echo
        echo "Written by \`make bench\` (\`bench/run.sh\`); see [bench/README.md](../README.md) for the method."
        echo "Every reference is measured in the same run, on the same machine, right next to ours:"
        echo "read the ratios, not the absolute numbers."
        echo
        echo "| | |"
        echo "| --- | --- |"
        echo "| run | $rep_start, $((secs / 60)) min $((secs % 60)) s (bench/run.sh; the build before it not counted) |"
        echo "| status | $status |"
        echo "| machine | $(nproc) cores, $mem, $cpu ($(uname -sr)) |"
        echo "| load average (1/5/15 min) | at the start $rep_load_start, at the end $load_end$(rep_load_note "$rep_load_start" "$load_end") |"
        echo "| commit | \`$commit\`$([ -n "$dirty" ] && echo " with uncommitted changes") ($(git -C "$ROOT" rev-parse --abbrev-ref HEAD 2>/dev/null)) |"
        echo "| knobs | ${knobs:-} |"
        if [ -s "$BENCH_RESULTS/ingest-devices.tsv" ] && [ -s "$BENCH_RESULTS/ingest-devices.svg" ]; then
            echo "| plot | [ingest throughput vs number of devices](ingest-devices.svg) ([data](ingest-devices.tsv)) |"
        fi
        echo
        echo "ratio = ours / reference value; *better* says which way is good (and the target, where the console"
        echo "states one). A reference of \"-\" means the console gives none: the figure is for information."
        echo
        echo "| section | figure | ours | reference | reference value | ratio | better |"
        echo "| --- | --- | ---: | --- | ---: | ---: | --- |"
        for s in "${BENCH_SECTIONS[@]}"; do
            awk -F'\t' -v s="$s" -v secs="$rep_dir/sections.tsv" '
                function esc(x) { gsub(/\|/, "\\|", x); return x }
                BEGIN { while ((getline l < secs) > 0) { split(l, f, "\t"); if (f[1] == s) { st = f[2]; why = f[3] } } }
                $1 == s {
                    printf "| %s | %s | %s | %s | %s | %s | %s |\n", (n++ ? "" : "**" esc(s) "**"), esc($2), esc($3), \
                        esc($4), esc($5), esc($6), esc($7)
                }
                END {
                    if (st == "failed")
                        printf "| %s | **section failed** (%s): what follows it was not measured | | | | | |\n", \
                            (n ? "" : "**" esc(s) "**"), esc(why)
                }' "$rep_dir/rows.tsv"
        done
        if [ -n "$notrun" ]; then
            echo
            echo "Not run (an earlier section stopped the run): $notrun."
        fi
        if [ -s "$rep_dir/warnings.tsv" ]; then
            echo
            echo "Warnings printed during the run:"
            echo
            awk -F'\t' '{printf "- %s: %s\n", $1, $2}' "$rep_dir/warnings.tsv"
        fi
    } >"$out.tmp" && mv "$out.tmp" "$out"
    echo "bench: results in ${out#"$ROOT"/} ($status)"
}

# A note when other work shared the machine (a 1-minute load above ~2.5 on this 2-core box).
rep_load_note() {
    awk -v a="${1%% *}" -v b="${2%% *}" -v n="$(nproc)" 'BEGIN {
        lim = n * 1.25
        if (a > lim || b > lim)
            printf "; **loaded machine**: other jobs were using the CPU (1-minute load above %.1f), so absolute figures are low and ratios noisier than usual", lim
    }'
}
