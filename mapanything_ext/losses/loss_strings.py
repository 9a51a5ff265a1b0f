"""MapAnything's loss strings, parsed and built without `eval`.

MapAnything describes a criterion as a Python expression over its losses module, e.g.
`ConfLoss(Regr3D(L2Loss(), norm_mode='avg_dis'), alpha=0.2) + 0.3 * NonAmbiguousMaskLoss(...)`.
Evaluating such a string with empty builtins is no sandbox (attribute chains reach any class of
the interpreter), so we parse it with `ast` and build it from a whitelist:

  calls of names from the given namespace (MapAnything's losses module), with positional and
  keyword arguments; int/float/str/bool/None constants; tuples and lists; `a + b`, `a * b`, `-a`.

Anything else (attribute access, subscripts, comprehensions, lambdas, other names, other
operators) is refused with a message that shows the offending part of the string.
"""

from __future__ import annotations

import ast
import operator


class LossStringError(ValueError):
    """A loss string uses something outside the whitelist, or cannot be built."""


_BINARY = {ast.Add: operator.add, ast.Mult: operator.mul}


def build_loss(expression: str, namespace: dict):
    """The object `expression` describes, built from `namespace` (names -> classes/functions)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise LossStringError(f"loss string {expression!r} is not an expression: {err.msg}") from None
    return _Builder(expression, namespace).build(tree.body)


class _Builder:
    def __init__(self, expression: str, namespace: dict):
        self.expression = expression
        self.namespace = namespace

    def refuse(self, node: ast.AST, why: str):
        part = ast.get_source_segment(self.expression.strip(), node) or ast.dump(node)
        raise LossStringError(f"loss string {self.expression!r}: {why}: {part!r}")

    def build(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, (bool, int, float, str)):
                return node.value
            self.refuse(node, "only numbers, strings, booleans and None are allowed as constants")
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.build(item) for item in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.build(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](self.build(node.left), self.build(node.right))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Name):
            self.refuse(node, "a name may only be called (a loss class or function of MapAnything's losses)")
        self.refuse(node, f"{type(node).__name__} is not allowed (only calls, constants, tuples, lists, +, * and -)")

    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            self.refuse(node.func, "only names of MapAnything's losses module may be called")
        if node.func.id not in self.namespace:
            self.refuse(node.func, "not a name of MapAnything's losses module")
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(kw.arg is None for kw in node.keywords):
            self.refuse(node, "*args and **kwargs are not allowed")
        args = [self.build(arg) for arg in node.args]
        kwargs = {kw.arg: self.build(kw.value) for kw in node.keywords}
        try:
            return self.namespace[node.func.id](*args, **kwargs)
        except Exception as err:
            raise LossStringError(f"loss string {self.expression!r}: {node.func.id}(...) failed: {err}") from err
