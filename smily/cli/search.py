"""`smily search`, `search-slides`, `read-region` and `export`: queries, the images of their hits, their results as files."""

from __future__ import annotations

import sys

from .common import EXAMPLE, api, client, example, key_values, parse_region, with_gateway

PARTIAL_HELP = "answer from the live index shards when one has none live (the answer names the missing ones)"


def print_missing(resp) -> None:
    """Say which index shards a partial answer left out (on stderr: the hits stay on stdout)."""
    if resp.partial:
        shards = ", ".join(map(str, resp.missing_shards))
        print(f"partial answer: index shard(s) {shards} did not answer; their slides are missing", file=sys.stderr)


def _concept_weights(items) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, weight = item.partition("=")
        try:
            out[name] = float(weight)
        except ValueError:
            raise SystemExit(f"--concept takes NAME=WEIGHT, got {item!r}") from None
        if not sep or not name:
            raise SystemExit(f"--concept takes NAME=WEIGHT, got {item!r}")
    return out


def search(args) -> int:
    c = client(args)
    if args.image and args.slide:
        raise SystemExit("give either --image FILE or --slide ID --region X,Y,W,H")
    if not (args.image or args.slide or args.positive):
        raise SystemExit("give --image FILE, --slide ID --region X,Y,W,H or --positive examples")
    query: dict[str, bytes | dict] = {}
    if args.image:
        with open(args.image, "rb") as fh:
            query["image"] = fh.read()
    elif args.slide:
        if not args.region:
            raise SystemExit("--slide needs --region X,Y,W,H")
        query["region"] = dict(slide_id=args.slide, **parse_region(args.region))
    resp = c.search(
        **query,
        k=args.k,
        exclude_query_slide=args.exclude_query_slide,
        positives=[example(e) for e in args.positive or []],
        negatives=[example(e) for e in args.negative or []],
        negative_weight=args.negative_weight,
        concepts=_concept_weights(args.concept),
        max_hits_per_slide=args.max_per_slide,
        page_size=args.page_size,
        page_token=args.page_token,
        slide_ids=args.slide_id or [],
        filters=key_values(args.filter, "--filter"),
        exclude_slide_ids=args.exclude_slide or [],
        exclude_query_case=args.exclude_query_case,
        nprobe=args.nprobe,
        image_mpp=args.image_mpp,
        partial=args.partial,
    )
    from smily.output import print_hits, print_json

    if args.json:
        print_json(resp)
        return 0
    print_hits(resp)
    print_missing(resp)
    if resp.next_page_token:
        print(f"next page: --page-token {resp.next_page_token}", file=sys.stderr)
    if resp.label_stats.key:
        st = resp.label_stats
        shares = ", ".join(f"{lc.label or '(none)'} {lc.count} ({lc.score_share:.0%})" for lc in st.labels)
        print(f"{st.key} of the top {st.k} hits (a retrieval statistic, not a diagnosis): {shares}", file=sys.stderr)
    print(f"export: smily export {resp.search_id}", file=sys.stderr)
    return 0


def export(args) -> int:
    """Writes an earlier search's results (its search id) as GeoJSON, or as a DICOM bulk
    annotations object of one slide (built by the gateway from the slide's archive), to
    --output or stdout; --stow stores the DICOM object in an archive (--dicomweb URL)."""
    if args.format == "dicom-ann" and not args.slide_id:
        raise SystemExit("--format dicom-ann needs --slide-id")
    if args.stow and not (args.format == "dicom-ann" and args.dicomweb):
        raise SystemExit("--stow needs --format dicom-ann and --dicomweb URL (the archive to store in)")
    data = client(args).export_search(args.search_id, args.format, args.slide_id)[1]
    if args.stow:
        import io

        import pydicom
        from dicomweb_client.api import DICOMwebClient

        from smily.common import phi

        ann = pydicom.dcmread(io.BytesIO(data))
        archive = DICOMwebClient(args.dicomweb)
        # The API withholds the patient's, visit's and specimen's identifiers: they come back
        # from the archive the object joins, with this user's own access to it.
        try:
            phi.restore(ann, phi.annotated_image(archive, ann))
        except LookupError as exc:
            raise SystemExit(str(exc)) from None
        archive.store_instances([ann])
        print(f"stored {ann.SOPInstanceUID} in series {ann.SeriesInstanceUID}", file=sys.stderr)
    if args.output:
        with open(args.output, "wb") as fh:
            fh.write(data)
    elif not args.stow:
        sys.stdout.buffer.write(data)
    return 0


def search_slides(args) -> int:
    from smily.client import hit_dict

    if bool(args.slide_id) == bool(args.source):
        raise SystemExit("give either --slide-id ID or --source PATH")
    resp = client(args).search_slides(
        slide_id=args.slide_id or "",
        source=args.source or "",
        k=args.k,
        mosaic_size=args.mosaic_size,
        exclude_query_slide=args.exclude_query_slide,
        slide_mpp=args.slide_mpp,
        partial=args.partial,
    )
    if args.json:
        from smily.output import print_json

        print_json(resp)
        return 0
    slides = [
        {
            "tenant": s.tenant,
            "slide_id": s.slide_id,
            "score": round(float(s.score), 4),
            "matched_mosaic_tiles": s.matched_mosaic_tiles,
            "metadata": dict(s.metadata),
            "regions": [hit_dict(h) for h in s.regions],
        }
        for s in resp.slides
    ]
    print(f"{len(slides)} slides (mosaic of {resp.mosaic_size} tiles, model {resp.model_id})")
    for i, s in enumerate(slides, 1):
        best = s["regions"][0] if s["regions"] else None
        where = f"best region {best['x']},{best['y']},{best['width']},{best['height']}" if best else ""
        print(
            f"{i:>4}  {s['score']:>6.3f}  {s['tenant']:<12} {s['slide_id']:<24} "
            f"{s['matched_mosaic_tiles']:>3} tiles matched  {where}"
        )
    print_missing(resp)
    return 0


def read_region(args) -> int:
    region = dict(slide_id=args.slide_id, **parse_region(args.region))
    resp = client(args).read_region(
        region, mpp=args.mpp, max_side=args.max_side, jpeg=args.output.lower().endswith((".jpg", ".jpeg"))
    )
    with open(args.output, "wb") as fh:
        fh.write(resp.image)
    if args.json:
        from smily.output import message_dict, print_json

        fields = {k: v for k, v in message_dict(resp).items() if k != "image"}  # the image is in the file
        print_json({"output": args.output, **fields})
        return 0
    print(f"wrote {args.output}: {resp.width}x{resp.height} at {resp.mpp:.3f} um/px")
    return 0


def register(sub) -> None:
    s = api(sub.add_parser("search", help="find similar regions"))
    s.add_argument("--image", help="PNG or JPEG patch")
    s.add_argument("--slide", help="indexed slide id, with --region")
    s.add_argument("--region", help="X,Y,W,H in level-0 pixels")
    s.add_argument(
        "--image-mpp",
        type=float,
        default=0.0,
        help="microns per pixel of --image (default 1.0): searched at the nearest indexed resolution",
    )
    s.add_argument("--k", type=int, default=None, help="number of hits (default 10)")
    s.add_argument("--exclude-query-slide", action="store_true", help="leave the region examples' slides out")
    s.add_argument(
        "--exclude-query-case",
        action="store_true",
        help="leave every slide of the query slide's case out (metadata SMILY_CASE_KEY, default case_id)",
    )
    s.add_argument(
        "--filter", action="append", metavar="KEY=VALUE", help="only slides with this metadata (all must hold)"
    )
    s.add_argument("--slide-id", action="append", metavar="ID", help="only tiles of these slides")
    s.add_argument("--exclude-slide", action="append", metavar="ID", help="leave this slide out")
    s.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (default: the index's)")
    s.add_argument("--positive", action="append", metavar="EXAMPLE", help=f"more like this: {EXAMPLE}")
    s.add_argument("--negative", action="append", metavar="EXAMPLE", help=f"less like this: {EXAMPLE}")
    s.add_argument("--negative-weight", type=float, default=None, help="Rocchio weight of negatives (default 0.5)")
    s.add_argument("--concept", action="append", metavar="NAME=WEIGHT", help="steer by a concept (weight < 0: less)")
    s.add_argument("--max-per-slide", type=int, default=0, help="at most this many hits per slide")
    s.add_argument("--page-size", type=int, default=0, help="hits per page (default: all k hits on one page)")
    s.add_argument("--page-token", default="", help="the next page, as the previous page printed it")
    s.add_argument("--partial", action="store_true", help=PARTIAL_HELP)
    s.set_defaults(func=search)

    s = with_gateway(
        sub.add_parser("export", help="an earlier search's results as GeoJSON (QuPath) or DICOM annotations (PACS)")
    )
    s.add_argument("search_id", help="as `smily search` printed it")
    s.add_argument(
        "--format",
        default="geojson",
        choices=["geojson", "dicom-ann"],
        help="geojson, or dicom-ann: a Microscopy Bulk Simple Annotations object of --slide-id",
    )
    s.add_argument("--slide-id", default="", help="only this slide's hits (one FeatureCollection per slide)")
    s.add_argument("--dicomweb", help="with --stow: the DICOMweb URL of the archive to store in")
    s.add_argument("--stow", action="store_true", help="dicom-ann: store the object in --dicomweb (STOW-RS)")
    s.add_argument("--output", help="file to write (default: stdout, unless --stow)")
    s.set_defaults(func=export)

    s = api(sub.add_parser("search-slides", help="find similar whole slides (Yottixel)"))
    s.add_argument("--slide-id", help="an indexed slide")
    s.add_argument("--source", help="a slide path under the slide roots")
    s.add_argument("--k", type=int, default=None, help="number of slides (default 10)")
    s.add_argument("--mosaic-size", type=int, default=None, help="tiles in the query's mosaic (default 16)")
    s.add_argument("--exclude-query-slide", action="store_true", help="leave the query slide out of the answer")
    s.add_argument("--slide-mpp", type=float, default=0.0, help="with --source: as for ingest")
    s.add_argument("--partial", action="store_true", help=PARTIAL_HELP)
    s.set_defaults(func=search_slides)

    s = api(sub.add_parser("read-region", help="save the image of a slide region (a hit)"))
    s.add_argument("slide_id", help="an indexed slide")
    s.add_argument("region", help="X,Y,W,H in level-0 pixels")
    s.add_argument("--output", required=True, help=".png or .jpg file")
    s.add_argument("--mpp", type=float, default=0.0, help="output um/px (default: the tiling resolution)")
    s.add_argument("--max-side", type=int, default=0, help="longest side in pixels (default 1024)")
    s.set_defaults(func=read_region)
