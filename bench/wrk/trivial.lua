-- The baseline: the same placeOrder document and variables as place_order_one.lua, sent
-- to a strawberry server whose mutation does nothing (bench.commands:trivial_app).
dofile(os.getenv("WRK_LIB"))
