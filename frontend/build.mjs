// Builds the playground (GraphiQL) and the live order board into ../orderstream/static,
// which the Python package serves under /static. Every file a page needs ends up there:
// the pages' Content-Security-Policy allows this origin only, so the fonts and images that
// the npm packages inline into their CSS as data: URLs are written out as files too.
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "orderstream", "static");

const started = performance.now();
rmSync(out, { recursive: true, force: true });
mkdirSync(join(out, "assets"), { recursive: true });

const result = await esbuild.build({
  entryPoints: { playground: join(here, "src/playground.tsx"), live: join(here, "src/live.ts") },
  outdir: out,
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "iife",
  target: ["es2020"],
  jsx: "automatic",
  define: { "process.env.NODE_ENV": '"production"' },
  legalComments: "linked",
  metafile: true,
  logLevel: "warning",
});

const EXTENSIONS = { "font/woff2": "woff2", "font/woff": "woff", "image/png": "png", "image/svg+xml": "svg",
                     "image/gif": "gif", "image/jpeg": "jpg" };

function extractDataUrls(css) {
  return css.replace(/url\((["']?)data:([^;,]+)(;base64)?,(.*?)\1\)/g, (_match, _quote, mime, base64, body) => {
    const bytes = base64 ? Buffer.from(body, "base64") : Buffer.from(decodeURIComponent(body));
    const extension = EXTENSIONS[mime];
    if (!extension) throw new Error(`a data: URL of type ${mime} in the CSS: add its extension to build.mjs`);
    const name = `${createHash("sha256").update(bytes).digest("hex").slice(0, 16)}.${extension}`;
    writeFileSync(join(out, "assets", name), bytes);
    return `url(assets/${name})`;
  });
}

for (const file of Object.keys(result.metafile.outputs).filter((f) => f.endsWith(".css"))) {
  const path = join(here, file);
  writeFileSync(path, extractDataUrls(readFileSync(path, "utf8")));
}

copyFileSync(join(here, "src", "favicon.svg"), join(out, "favicon.svg"));

const files = readdirSync(out, { recursive: true }).map((name) => join(out, name)).filter((p) => statSync(p).isFile());
const bytes = files.reduce((sum, path) => sum + statSync(path).size, 0);
const seconds = ((performance.now() - started) / 1000).toFixed(1);
console.log(`built ${files.length} files, ${(bytes / 1024).toFixed(0)} KiB, into ${out} in ${seconds} s`);
