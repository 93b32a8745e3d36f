"""Open layers or a stored project with headless QGIS and report what QGIS sees, as JSON.

Runs under Debian's /usr/bin/python3 (where ``python3-qgis`` installs the bindings), never the
project's venv: ``QT_QPA_PLATFORM=offscreen /usr/bin/python3 qgis_probe.py SPEC.json``.

SPEC: ``{"layers": [{"name", "uri", "provider", "qml" (optional: a style to apply)}],
"project": "postgresql:?...", "factors": [1, 4, 16], "out": "/dir"}``.
For every layer (given, or in the project): validity, CRS,
renderer type, feature count, and for each factor ``k`` a render of the layer's extent at
1/k of its full resolution (a raster's own pixel count; 512 px for vectors) with the number
of non-transparent pixels. With a project, also its group tree, its own extent and one PNG of
the whole project (``project.png``).
"""

from __future__ import annotations

import json
import os
import sys

from qgis.core import (
    QgsApplication,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage
from qgis.PyQt.QtXml import QDomDocument


def render(layers, extent, crs, width: int, height: int, path: str | None) -> int:
    ms = QgsMapSettings()
    ms.setLayers(layers)
    ms.setDestinationCrs(crs)
    ms.setOutputSize(QSize(max(width, 1), max(height, 1)))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor(0, 0, 0, 0))
    job = QgsMapRendererSequentialJob(ms)
    job.start()
    job.waitForFinished()
    img = job.renderedImage().convertToFormat(QImage.Format_ARGB32)
    if path:
        img.save(path)
    bits = img.constBits()
    bits.setsize(img.sizeInBytes())
    data = bytes(bits)
    return sum(1 for a in data[3::4] if a)


def describe(layer, factors, out: str | None) -> dict:
    info = {"name": layer.name(), "valid": layer.isValid(), "provider": layer.providerType(),
            "crs": layer.crs().authid(), "source": layer.source()}
    if not layer.isValid():
        return info
    r = layer.renderer()
    info["renderer"] = r.type() if r is not None else None
    if isinstance(layer, QgsVectorLayer):
        info["features"] = layer.featureCount()
        info["geometry_type"] = layer.wkbType()
        fields = layer.fields()
        info["widgets"] = {f.name(): layer.editorWidgetSetup(i).type() for i, f in enumerate(fields)
                           if layer.editorWidgetSetup(i).type()}
        info["editable"] = bool(layer.dataProvider().capabilities() & layer.dataProvider().ChangeAttributeValues)
        if r is not None and r.type() == "categorizedSymbol":
            info["categories"] = [str(c.value()) for c in r.categories()]
        base = 512
    else:
        info["width"], info["height"] = layer.width(), layer.height()
        if r is not None and r.type() == "paletted":
            info["classes"] = [[c.value, c.color.name(), c.color.alpha()] for c in r.classes()]
        base = max(layer.width(), layer.height())
    ext = layer.extent()
    info["extent"] = [ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()]
    aspect = ext.height() / ext.width() if ext.width() else 1.0
    info["renders"] = {}
    for k in factors:
        w = max(8, round(base / k))
        path = os.path.join(out, f"{layer.name()}_{k}.png") if out else None
        info["renders"][str(k)] = render([layer], ext, layer.crs(), w, max(1, round(w * aspect)), path)
    return info


def tree(node) -> list:
    out = []
    for child in node.children():
        if child.nodeType() == 0:  # group
            out.append({"group": child.name(), "children": tree(child)})
        else:
            out.append(child.layer().name() if child.layer() else None)
    return out


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    factors = spec.get("factors", [1, 4, 16])
    out = spec.get("out")
    app = QgsApplication([], False)
    app.initQgis()
    result = {"qgis": app.applicationVersion() if hasattr(app, "applicationVersion") else "",
              "layers": []}
    from qgis.core import Qgis
    result["qgis"] = Qgis.version()
    if spec.get("project"):
        project = QgsProject.instance()
        result["project_read"] = project.read(spec["project"])
        result["tree"] = tree(project.layerTreeRoot())
        layers = [t.layer() for t in project.layerTreeRoot().findLayers()]
        vs = project.viewSettings()
        ext = vs.defaultViewExtent()
        result["project_extent"] = [ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()]
        result["project_crs"] = project.crs().authid()
        visible = [t.layer() for t in project.layerTreeRoot().findLayers() if t.isVisible()]
        if out:
            w = spec.get("project_px", 640)
            h = max(1, round(w * ext.height() / ext.width())) if ext.width() else w
            result["project_render"] = render(visible, ext, project.crs(), w, h,
                                              os.path.join(out, "project.png"))
    else:
        layers = []
        for item in spec["layers"]:
            if item["provider"] in ("postgresraster", "gdal"):
                layer = QgsRasterLayer(item["uri"], item["name"], item["provider"])
            else:
                layer = QgsVectorLayer(item["uri"], item["name"], item["provider"])
            if item.get("qml") and layer.isValid():
                doc = QDomDocument()
                doc.setContent(item["qml"])
                layer.importNamedStyle(doc)
            layers.append(layer)
    for layer in layers:
        result["layers"].append(describe(layer, factors, out))
    print(json.dumps(result))
    app.exitQgis()


if __name__ == "__main__":
    main()
