(module
  (memory 1)
  (func (export "run") (local $p i32)
    (loop
      (local.set $p (memory.grow (i32.const 1)))
      (memory.fill (i32.mul (local.get $p) (i32.const 65536)) (i32.const 7) (i32.const 65536))
      (br 0))))
