#!/bin/sh
# Copies the chat UI's browser libraries out of an installed node_modules into
# the UI's vendor folder. One list for `make ui` and for the socket image's
# build stage (Dockerfile), so the two cannot drift apart.
#   usage: scripts/vendor-ui.sh <node_modules dir> <vendor dir>
set -eu
modules=$1
vendor=$2
mkdir -p "$vendor"
cp "$modules/socket.io-client/dist/socket.io.min.js" \
   "$modules/marked/lib/marked.umd.js" \
   "$modules/dompurify/dist/purify.min.js" \
   "$modules/@highlightjs/cdn-assets/highlight.min.js" \
   "$vendor/"
cp "$modules/@highlightjs/cdn-assets/styles/github.min.css" "$vendor/highlight-github.min.css"
