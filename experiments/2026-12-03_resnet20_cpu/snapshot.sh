#!/usr/bin/env bash
# Copies what the campaign needs to resume from a live workdir into workdir/ here (to commit):
# the newest finished checkpoint step of every phase with its fingerprint, the run's logs and
# records. Orbax writes a step atomically (commit_success.txt last), so a step without it is
# skipped. Usage: bash snapshot.sh /path/to/live/workdir [/path/to/console.log]
set -euo pipefail
src=${1:?usage: snapshot.sh LIVE_WORKDIR [CONSOLE_LOG]}
here=$(cd "$(dirname "$0")" && pwd)
dst="$here/workdir"
rm -rf "$dst.new" && mkdir -p "$dst.new/checkpoints"
for f in run_info.json config.txt metrics.jsonl results.json results.md; do
  [ -f "$src/$f" ] && cp "$src/$f" "$dst.new/"
done
[ -d "$src/models" ] && cp -r "$src/models" "$dst.new/"
for phase in "$src"/checkpoints/*/; do
  name=$(basename "$phase")
  newest=$(ls -1 "$phase" | grep -E '^[0-9]+$' | sort -n | while read s; do
             [ -f "$phase/$s/commit_success.txt" ] && echo "$s"; done | tail -1)
  mkdir -p "$dst.new/checkpoints/$name"
  cp "$phase"/*.json "$dst.new/checkpoints/$name/" 2>/dev/null || true
  [ -n "$newest" ] && cp -r "$phase/$newest" "$dst.new/checkpoints/$name/"
done
[ -n "${2:-}" ] && [ -f "$2" ] && grep -v -E 'oneDNN|absl::InitializeLog' "$2" > "$here/console.log"
rm -rf "$dst" && mv "$dst.new" "$dst"
du -sh "$dst"
