"""Static checks of the Qt module file and its .ui form (desktop Slicer cannot run here).

Every ``self.ui.X`` the module reads exists in the .ui file, every slot it connects is a method of the widget,
every Qt signal it connects to exists on that widget's class, the file compiles, and importing what it imports
at load time does not import torch (torch is imported when Register is first pressed).
"""

from __future__ import annotations

import ast
import py_compile
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "ICONRegistration"
MODULE_FILE = MODULE_DIR / "ICONRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ICONRegistration.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "ICONRegistration.png"

#: signals of the Qt / CTK / MRML widget classes the form uses (from their public headers)
SIGNALS = {
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                          "currentNodeIDChanged(QString)", "nodeAdded(vtkMRMLNode*)"},
    "QComboBox": {"currentIndexChanged(int)", "activated(int)", "currentTextChanged(QString)"},
    "QSpinBox": {"valueChanged(int)", "editingFinished()"},
    "QCheckBox": {"toggled(bool)", "clicked(bool)", "stateChanged(int)"},
    "QRadioButton": {"toggled(bool)", "clicked(bool)"},
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "ctkCollapsibleButton": {"contentsCollapsed(bool)", "clicked(bool)"},
}


def ui_widgets() -> dict[str, str]:
    """``{objectName: class}`` of every named widget in the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget") if w.get("name")}


def widget_class_node() -> ast.ClassDef:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ICONRegistrationWidget")


def ui_attribute_uses(tree: ast.AST) -> set[str]:
    """Names X in every ``self.ui.X`` expression."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def connections(tree: ast.AST) -> list[tuple[str | None, str | None, str]]:
    """``(ui widget name or None, signal string or None, slot method name)`` of each ``….connect(self.slot)``."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        slot = node.args[-1] if node.args else None
        if not (isinstance(slot, ast.Attribute) and isinstance(slot.value, ast.Name) and slot.value.id == "self"):
            continue
        signal = node.args[0].value if len(node.args) == 2 and isinstance(node.args[0], ast.Constant) else None
        target = node.func.value
        widget = None
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) and target.value.attr == "ui":
            widget = target.attr
        elif isinstance(target, ast.Name):
            widget = None  # a loop variable over ui widgets: checked through the loop's tuple below
        found.append((widget, signal, slot.attr))
    return found


def test_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "module.pyc"), doraise=True)


def test_every_ui_attribute_the_module_reads_exists_in_the_ui_file():
    widgets = ui_widgets()
    used = ui_attribute_uses(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
    assert len(used) > 20
    missing = sorted(used - set(widgets))
    assert not missing, f"self.ui attributes missing from {UI_FILE.name}: {missing}"


def test_every_connected_slot_exists_and_every_signal_exists_on_its_widget_class():
    widget_class = widget_class_node()
    methods = {n.name for n in widget_class.body if isinstance(n, ast.FunctionDef)}
    widgets = ui_widgets()
    found = connections(widget_class)
    assert len(found) > 10
    for widget, signal, slot in found:
        assert slot in methods, f"connected slot self.{slot} is not a method of ICONRegistrationWidget"
        if widget is not None and signal is not None:
            assert signal in SIGNALS[widgets[widget]], f"{widgets[widget]} {widget} has no signal {signal}"
    # signals connected in loops: "for selector in (self.ui.a, self.ui.b): selector.connect(SIGNAL, …)"
    for loop in ast.walk(widget_class):
        if not (isinstance(loop, ast.For) and isinstance(loop.iter, ast.Tuple)):
            continue
        names = [e.attr for e in loop.iter.elts if isinstance(e, ast.Attribute)]
        for call in ast.walk(loop):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "connect"
                    and call.args and isinstance(call.args[0], ast.Constant)):
                for name in names:
                    assert call.args[0].value in SIGNALS[widgets[name]], (name, call.args[0].value)


def test_ui_file_is_consistent():
    root = ET.parse(UI_FILE).getroot()
    widgets = ui_widgets()
    top = root.find("widget").get("name")
    assert top == "ICONRegistration" and widgets[top] == "qMRMLWidget"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = set(widgets.values())
    assert {c for c in used_classes if not c.startswith("Q")} <= custom
    names = [w.get("name") for w in root.iter("widget") if w.get("name")]
    assert len(names) == len(set(names)), "duplicate object names"
    for connection in root.iter("connection"):
        assert connection.findtext("sender") == top
        assert connection.findtext("receiver") in widgets
        assert connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    # every MRML selector and the metrics view get the scene
    receivers = {c.findtext("receiver") for c in root.iter("connection")}
    mrml_widgets = {n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert mrml_widgets <= receivers


def test_module_classes_help_and_citations():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"ICONRegistration", "ICONRegistrationWidget", "ICONRegistrationLogic", "ICONRegistrationTest"} <= classes
    text = MODULE_FILE.read_text(encoding="utf-8")
    for method in ("ICON:", "GradICON:", "uniGradICON:", "ConstrICON:", "SITReg:"):
        assert method in text, method


def test_module_imports_no_torch_when_slicer_loads_it():
    """The libraries the module imports at load time must not pull in torch (nor download anything)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    ours = sorted({n.module for n in top_level if isinstance(n, ast.ImportFrom) and n.module
                   and n.module.startswith("ICONRegistrationLib")})
    assert ours, "expected the module to import ICONRegistrationLib"
    third_party = {a.name.split(".")[0] for n in top_level if isinstance(n, ast.Import) for a in n.names}
    third_party |= {n.module.split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in third_party
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = ("import sys; sys.path.insert(0, %r)\n" % str(MODULE_DIR)
            + "".join(f"import {name}\n" for name in ours)
            + "from ICONRegistrationLib.mrml.logic import ICONRegistrationLogic\n"
              "ICONRegistrationLogic.modelChoices()\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_icon_is_a_128_pixel_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_cmake_builds_the_scripted_module_with_generic_tests_and_its_resources():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "Resources/UI/${MODULE_NAME}.ui" in text and "Resources/Icons/${MODULE_NAME}.png" in text
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                "EXTENSION_DEPENDS"):
        assert key in top
    assert 'EXTENSION_DEPENDS "PyTorch"' in top
